// The URL of valet's API as the run sees it.
export const API_URL: string = Deno.env.get("VALTOWN_API_URL") ?? "https://api.val.town";
