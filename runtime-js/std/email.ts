// std/email: send email as the val's owner, through valet's outbox.
import { apiJson } from "./_client.ts";

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
  attachments?: { filename: string; content: string; type?: string; disposition?: string }[];
}

export async function email(options: EmailOptions): Promise<{ id: number; status: string }> {
  return await apiJson("/v1/email", { method: "POST", body: JSON.stringify(options) });
}

export default email;
