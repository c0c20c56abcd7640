// std/email: send email as the val's owner, through valet's outbox.
// Like the hosted module, it answers the API's JSON once the email is
// accepted (`{ message: "Email accepted to be sent", ... }`) and throws an
// Error whose message starts "Val Town Email Error: " when it is not.
import { api, failure, ValTownApiError } from "./_client.ts";

type Address = string | { email: string; name?: string };

export interface EmailOptions {
  to?: Address | Address[];
  from?: Address;
  cc?: Address | Address[];
  bcc?: Address | Address[];
  replyTo?: Address | Address[];
  subject?: string;
  text?: string;
  html?: string;
  headers?: Record<string, string>;
  attachments?: {
    filename: string;
    /** Base64, as `btoa` gives it. */
    content: string;
    type?: string;
    disposition?: string;
    contentId?: string;
  }[];
}

export interface EmailResult {
  message: string;
  [field: string]: unknown;
}

export async function email(options: EmailOptions): Promise<EmailResult> {
  const res = await api("/v1/email", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(options),
  });
  if (!res.ok) {
    const e = await failure(res);
    throw new ValTownApiError(`Val Town Email Error: ${e.message}`, e.status, e.code, e.required);
  }
  return await res.json();
}

export default email;
