// The email examples of the hosted docs (docs.val.town, "Email"), as
// written there, with their results checked.
import { email } from "https://esm.town/v/std/email";
import { expect, expectThrows } from "./_expect.ts";

// Basic usage: to the val's owner.
const sent = await email({
  subject: "Hello from Val Town",
  text: "This is a test email sent from a Val Town val.",
});
expect("accepted", sent.message, "Email accepted to be sent");

// Attachments, base64 with btoa.
const attached = await email({
  attachments: [
    {
      content: btoa("hello attachments!"),
      filename: "test.txt",
      type: "text",
      disposition: "attachment",
    },
  ],
});
expect("with an attachment", attached.message, "Email accepted to be sent");

// Custom headers.
const withHeaders = await email({ text: "Hi", headers: { "X-Custom-Header": "xxx" } });
expect("with headers", withHeaders.message, "Email accepted to be sent");

// replyTo, as a string and as {email, name}.
const replied = await email({
  replyTo: [{ email: "your_custom_email@valtown.email", name: "Me" }],
  text: "these pretzels are making me thirsty",
});
expect("with replyTo", replied.message, "Email accepted to be sent");

// An email that cannot be sent throws "Val Town Email Error: ...".
const error = await expectThrows("a bad address", () => email({ to: "not an address", text: "x" })) as Error;
expect("the error", error.message.startsWith("Val Town Email Error: "), true);
