// Shared by the vals here: throw, and so fail the run, when a value is not
// what the hosted platform gives.
export function expect(label: string, actual: unknown, expected: unknown): void {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${label}: expected ${e}, got ${a}`);
  console.log(`ok ${label}`);
}

export async function expectThrows(label: string, call: () => Promise<unknown>): Promise<unknown> {
  try {
    await call();
  } catch (e) {
    console.log(`ok ${label} threw`);
    return e;
  }
  throw new Error(`${label}: expected an error, got none`);
}
