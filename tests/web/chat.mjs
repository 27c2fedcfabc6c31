// The web chat in a real browser (Debian's Chromium, driven by Playwright),
// against a running loopd with the echo agent. Each step saves a screenshot.
// Run by tests/it/web.rs: node tests/web/chat.mjs (settings from the env).
import { chromium } from "playwright-core";
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";

const url = process.env.LOOPD_URL;
const user = process.env.LOOPD_USER;
const password = process.env.LOOPD_PASSWORD;
const botToken = process.env.LOOPD_BOT_TOKEN;
const shots = process.env.SHOTS_DIR;
const dataDir = process.env.LOOPD_DATA_DIR;
mkdirSync(shots, { recursive: true });
const WAIT = { timeout: 20000 };

const context = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "loopd-chromium-")), {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
  viewport: { width: 1000, height: 760 },
});
const page = context.pages()[0] || (await context.newPage());
const problems = [];
page.on("dialog", async (d) => { problems.push(`a dialog opened: ${d.message()}`); await d.dismiss(); });
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
// A 401 is how the page learns it must log in; anything else logged as an error is a bug.
page.on("console", (m) => {
  if (m.type() === "error" && !/status of 401/.test(m.text())) problems.push(`console error: ${m.text()}`);
});

/** axe-core run in the page (through the devtools protocol, so the page's
 * CSP stays as it is): serious and critical violations fail the test. */
const axeSource = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");
async function accessible(view) {
  await page.evaluate(axeSource);
  const found = await page.evaluate(async () => {
    const r = await window.axe.run(document, { resultTypes: ["violations"] });
    return r.violations.filter((v) => v.impact === "serious" || v.impact === "critical")
      .map((v) => `${v.id} (${v.impact}): ${v.help} at ${v.nodes.map((n) => n.target.join(" ")).slice(0, 3).join(", ")}`);
  });
  if (found.length) throw new Error(`accessibility of ${view}:\n  ${found.join("\n  ")}`);
}

let n = 0;
async function step(name, fn) {
  process.stdout.write(`- ${name} … `);
  try {
    await fn();
  } catch (e) {
    await page.screenshot({ path: join(shots, `FAILED-${name}.png`), fullPage: true }).catch(() => {});
    throw e;
  }
  n += 1;
  await page.screenshot({ path: join(shots, `${String(n).padStart(2, "0")}-${name}.png`), fullPage: true });
  console.log("ok");
}

const lastTurn = () => page.locator("article.turn").last();
async function send(text) {
  const box = page.getByRole("textbox", { name: "Message" });
  await box.fill(text);
  await box.press("Enter");
}

try {
  await step("login", async () => {
    await page.goto(url);
    await page.getByLabel("Username").fill(user);
    await page.getByLabel("Password").fill(password);
    await page.getByRole("button", { name: "Log in" }).click();
    await page.getByRole("heading", { name: "Loops" }).waitFor(WAIT);
  });

  await step("create-loop", async () => {
    await page.getByLabel("Title").fill("Browser test");
    await page.getByRole("button", { name: "Create loop" }).click();
    await page.getByRole("heading", { name: "Browser test" }).waitFor(WAIT);
  });
  const loopId = decodeURIComponent(new URL(page.url()).hash.slice("#/loop/".length));

  await step("send-and-stream", async () => {
    await send("hello from the browser");
    await lastTurn().locator(".md", { hasText: "hello from the browser" }).waitFor(WAIT);
    await lastTurn().locator(".usage").waitFor(WAIT);
  });

  await step("permission", async () => {
    await send("/permission rm -rf build");
    await page.getByRole("button", { name: "Allow" }).click(WAIT);
    await lastTurn().getByText("Allowed: rm -rf build").waitFor(WAIT);
    await lastTurn().getByText("Allowed (from the web)").waitFor(WAIT);
  });

  await step("tool-input-and-output", async () => {
    await send("/tool listing the workspace");
    // This turn's row (not the one of the turn before, still the last a moment).
    const row = lastTurn().locator("details.tool", { hasText: "listing the workspace" });
    await row.locator("summary").click(WAIT);
    await row.locator("pre", { hasText: '"text": "listing the workspace"' }).waitFor(WAIT);
    await row.locator(".tool-output pre", { hasText: "listing the workspace" }).waitFor(WAIT);
    // A permission's Bash command shows as code once allowed.
    await send("/permission make deploy");
    await page.getByRole("button", { name: "Allow" }).click(WAIT);
    await lastTurn().getByText("Allowed: make deploy").waitFor(WAIT);
    await lastTurn().locator("details.tool summary", { hasText: "make deploy" }).click();
    await lastTurn().locator("pre.command", { hasText: "make deploy" }).waitFor(WAIT);
    // An Edit shows as a diff of what it replaces.
    await send("/edit src/main.rs");
    await lastTurn().getByText("Edited src/main.rs").waitFor(WAIT);
    await lastTurn().locator("details.tool summary", { hasText: "src/main.rs" }).click();
    await lastTurn().locator("pre.diff span.del", { hasText: "-let x = 1;" }).waitFor(WAIT);
    await lastTurn().locator("pre.diff span.add", { hasText: "+let x = 2;" }).waitFor(WAIT);
  });

  await step("files-panel", async () => {
    // What an agent would have written into the workspace.
    const uuid = loopId.slice("loop_".length);
    const ws = join(dataDir, "loops", uuid, "workspace");
    mkdirSync(join(ws, "notes"), { recursive: true });
    writeFileSync(join(ws, "notes", "plan.md"), "# The plan\n<script>alert(1)</script>\n");
    await page.getByRole("button", { name: "Files" }).click();
    const panel = page.getByRole("complementary", { name: "Workspace files" });
    await panel.getByRole("button", { name: "CLAUDE.md" }).waitFor(WAIT);
    await panel.getByRole("button", { name: "notes/" }).click();
    await panel.getByRole("button", { name: "plan.md" }).click();
    await panel.getByLabel("Content of notes/plan.md").getByText("<script>alert(1)</script>").waitFor(WAIT);
    // Highlighted by its language (Markdown), as text.
    await panel.locator("code.hljs.language-md span").first().waitFor(WAIT);
    if (await page.locator("main script").count() !== 0) throw new Error("file content became HTML");
    await page.getByRole("button", { name: "Files" }).click();
  });

  await step("turn-mode-and-waiting-title", async () => {
    const sent = page.waitForRequest((r) => r.url().endsWith("/messages") && r.method() === "POST");
    await page.getByLabel("Permission mode of this message").selectOption("default");
    await send("/permission ls -la");
    const body = JSON.parse((await sent).postData());
    if (body.permission_mode !== "default") throw new Error(`sent ${JSON.stringify(body)}`);
    // A prompt waits: the title says so, and stops saying so once answered.
    await page.waitForFunction(() => document.title.startsWith("(1)"), null, WAIT);
    await page.getByRole("button", { name: "Deny" }).click(WAIT);
    await page.waitForFunction(() => document.title === "loopd", null, WAIT);
    await page.getByLabel("Permission mode of this message").selectOption("");
  });

  await step("question", async () => {
    await send("/question");
    await page.getByLabel(/^Blue/).check(WAIT);
    await page.getByLabel(/^S\b/).check();
    await page.getByLabel(/^L\b/).check();
    await page.getByRole("button", { name: "Answer" }).click();
    await lastTurn().locator(".md", { hasText: '"Which color do you prefer?":"Blue"' }).waitFor(WAIT);
    await lastTurn().locator(".md", { hasText: '"Which sizes do you need?":"S, L"' }).waitFor(WAIT);
  });

  await step("interrupt", async () => {
    await send("/sleep 30");
    await lastTurn().getByText("Working…").waitFor(WAIT);
    await page.keyboard.press("Escape");
    await lastTurn().getByText("Interrupted").waitFor(WAIT);
  });

  await step("reload-mid-turn", async () => {
    await send("/sleep 3");
    await lastTurn().getByText("Sleeping").waitFor(WAIT);
    await page.reload();
    await page.getByRole("heading", { name: "Browser test" }).waitFor(WAIT);
    await lastTurn().getByText("Sleeping").waitFor(WAIT);
    await lastTurn().getByText("awake.").waitFor(WAIT);
  });

  await step("bot-turn-appears-live", async () => {
    const res = await fetch(`${url}/api/v1/loops/${encodeURIComponent(loopId)}/messages`, {
      method: "POST",
      headers: { Authorization: `Bearer ${botToken}`, "Content-Type": "application/json" },
      body: JSON.stringify({ content: "message from a bot" }),
    });
    if (!res.ok) throw new Error(`bot send failed: ${res.status}`);
    await res.text(); // the bot reads its own stream to the end
    await page.locator(".user", { hasText: "message from a bot" }).waitFor(WAIT);
    await lastTurn().locator(".md", { hasText: "message from a bot" }).waitFor(WAIT);
  });

  await step("html-renders-as-text", async () => {
    const evil = "<img src=x onerror=alert(1)>";
    await send(evil);
    await lastTurn().locator(".user", { hasText: evil }).waitFor(WAIT);
    await lastTurn().locator(".md", { hasText: evil }).waitFor(WAIT);
    const images = await page.locator("main img").count();
    if (images !== 0) throw new Error(`model output made ${images} <img> element(s)`);
  });

  await step("dark-mode", async () => {
    await page.emulateMedia({ colorScheme: "dark" });
    const bg = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    if (bg === "rgb(255, 255, 255)") throw new Error("dark mode did not apply");
    await page.emulateMedia({ colorScheme: "light" });
  });

  await step("phone-width", async () => {
    await page.setViewportSize({ width: 390, height: 760 });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (overflow > 0) throw new Error(`the page is ${overflow}px wider than a phone`);
  });

  await step("tokens", async () => {
    await page.setViewportSize({ width: 1000, height: 760 });
    await page.getByRole("link", { name: "Settings" }).click();
    await page.getByLabel("Label").fill("from the browser");
    await page.getByRole("button", { name: "Create token" }).click();
    const token = await page.locator("#new-token").textContent(WAIT);
    if (!/^la_[0-9a-f]{48}$/.test(token)) throw new Error(`not a token: ${token}`);
    await page.getByRole("list", { name: "API tokens" }).getByText("from the browser").waitFor(WAIT);

    // A read-only token that expires: the list says so, and the API holds it to it.
    await page.getByLabel("Label").fill("reader");
    await page.getByRole("checkbox", { name: /loops:read/ }).check();
    await page.getByLabel("Expires after (days)").fill("7");
    await page.getByLabel("Most permissive mode").selectOption("plan");
    await page.getByRole("button", { name: "Create token" }).click();
    await page.getByRole("list", { name: "API tokens" }).getByText(/^loops:read · expires .* · modes up to plan$/).waitFor(WAIT);
    const reader = await page.locator("#new-token").textContent(WAIT);
    // From the test itself, as a bot would (not the page: a refusal there is a console error).
    const asReader = async (method, path) => (await fetch(`${url}${path}`, {
      method, headers: { Authorization: `Bearer ${reader}`, "Content-Type": "application/json" },
      body: method === "GET" ? undefined : "{}",
    })).status;
    if (await asReader("GET", "/api/v1/loops") !== 200) throw new Error("a loops:read token cannot list loops");
    if (await asReader("POST", "/api/v1/loops") !== 403) throw new Error("a loops:read token could create a loop");
    await page.screenshot({ path: join(shots, "settings-scoped-token.png") });

    // Rotating shows the new token; the old one still works for its grace.
    await page.getByRole("button", { name: "Rotate reader" }).click();
    await page.getByText(/the old one works for one more hour/).waitFor(WAIT);
    const rotated = await page.locator("#new-token").textContent(WAIT);
    if (rotated === reader || !/^la_[0-9a-f]{48}$/.test(rotated)) throw new Error(`not a new token: ${rotated}`);
    if (await asReader("GET", "/api/v1/loops") !== 200) throw new Error("the old token stopped before its grace");
    await page.getByRole("button", { name: "Revoke from the browser" }).click();
    await page.getByRole("list", { name: "API tokens" }).getByText("from the browser").waitFor({ state: "detached", ...WAIT });
  });

  await step("loops-beside-the-conversation", async () => {
    const bot = (method, path, body) => fetch(`${url}${path}`, {
      method, headers: { Authorization: `Bearer ${botToken}`, "Content-Type": "application/json" },
      body: body ? JSON.stringify(body) : undefined,
    });
    // A loop with 55 turns, and one that waits on a prompt.
    const long = await (await bot("POST", "/api/v1/loops", { title: "Long history" })).json();
    for (let i = 1; i <= 55; i++) {
      await (await bot("POST", `/api/v1/loops/${long.id}/messages`, { content: `turn number ${i}` })).text();
    }
    const waiting = await (await bot("POST", "/api/v1/loops", { title: "Waiting on a prompt" })).json();
    const asking = await bot("POST", `/api/v1/loops/${waiting.id}/messages`, { content: "/permission make release" });
    const reader = asking.body.getReader();
    while (!new TextDecoder().decode((await reader.read()).value || new Uint8Array()).includes("requires_choice")) { /* until asked */ }

    await page.setViewportSize({ width: 1280, height: 800 });
    await page.goto(`${url}/#/loop/${encodeURIComponent(long.id)}`);
    const side = page.getByRole("navigation", { name: "Your loops" });
    await side.getByRole("link", { name: "Long history" }).waitFor(WAIT);
    if (await side.getByRole("link", { name: "Long history" }).getAttribute("aria-current") !== "page") {
      throw new Error("the open loop is not marked in the list");
    }
    // The one waiting says so; search finds it by title.
    await side.getByRole("searchbox", { name: "Search loops" }).fill("waiting");
    await side.getByRole("link", { name: "Long history" }).waitFor({ state: "detached", ...WAIT });
    const row = side.getByRole("listitem").filter({ hasText: "Waiting on a prompt" });
    await row.getByText("prompt", { exact: true }).waitFor(WAIT);
    await page.screenshot({ path: join(shots, "wide-light.png") });
    await page.emulateMedia({ colorScheme: "dark" });
    await page.screenshot({ path: join(shots, "wide-dark.png") });
    await page.emulateMedia({ colorScheme: "light" });

    // 50 turns first; the 5 older ones once scrolled to the top.
    await page.locator("article.turn").nth(49).waitFor(WAIT);
    if (await page.locator("article.turn").count() !== 50) throw new Error("not 50 turns at first");
    await page.getByText("turn number 55").first().waitFor(WAIT);
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.locator(".user", { hasText: /^turn number 1$/ }).waitFor(WAIT);
    if (await page.locator("article.turn").count() !== 55) throw new Error("older turns did not load");

    // Archived loops on demand.
    await bot("DELETE", `/api/v1/loops/${waiting.id}`);
    await side.getByRole("searchbox", { name: "Search loops" }).fill("");
    await side.getByRole("link", { name: "Waiting on a prompt" }).waitFor({ state: "detached", ...WAIT });
    await side.getByLabel("Archived").check();
    await side.getByRole("link", { name: "Waiting on a prompt" }).waitFor(WAIT);
    await reader.cancel();
    await page.setViewportSize({ width: 1000, height: 760 });
  });

  await step("repo-diff-and-paging", async () => {
    const bot = (method, path, body) => fetch(`${url}${path}`, {
      method, headers: { Authorization: `Bearer ${botToken}`, "Content-Type": "application/json" },
      body: body ? JSON.stringify(body) : undefined,
    });
    // A repo loop (tests/it/web.rs made `repos/app`) whose agent changed a file.
    const repoLoop = await (await bot("POST", "/api/v1/loops", { title: "Repo work", repo: "app" })).json();
    const uuid = repoLoop.id.slice("loop_".length);
    writeFileSync(join(dataDir, "loops", uuid, "workspace", "README.md"), "hello\nchanged by the agent\n");
    await page.goto(`${url}/#/loop/${encodeURIComponent(repoLoop.id)}`);
    await page.getByRole("heading", { name: "Repo work" }).waitFor(WAIT);
    await page.getByRole("button", { name: "Files" }).click();
    const panel = page.getByRole("complementary", { name: "Workspace files" });
    await panel.getByRole("button", { name: "Diff" }).click(WAIT);
    await panel.locator("pre.diff span.add", { hasText: "+changed by the agent" }).waitFor(WAIT);
    await page.getByRole("button", { name: "Files" }).click();

    // Past the first 50 loops: "More loops".
    for (let i = 1; i <= 52; i++) await (await bot("POST", "/api/v1/loops", { title: `bulk ${i}` })).json();
    await page.goto(`${url}/#/loops`);
    const list = page.locator("main").getByRole("list", { name: "Loops" });
    await list.getByRole("link", { name: "bulk 52" }).waitFor(WAIT);
    if (await list.getByRole("listitem").count() !== 50) throw new Error("not 50 loops on the first page");
    await page.getByRole("button", { name: "More loops" }).click();
    await list.getByRole("link", { name: "Repo work" }).waitFor(WAIT);
    if (await list.getByRole("listitem").count() <= 50) throw new Error("no second page");
  });

  await step("accessibility", async () => {
    await page.setViewportSize({ width: 1280, height: 800 });
    await page.goto(`${url}/#/loop/${encodeURIComponent(loopId)}`);
    await page.getByRole("heading", { name: "Browser test" }).waitFor(WAIT);
    await lastTurn().locator("details.tool summary").first().waitFor(WAIT).catch(() => {});
    await accessible("the chat (wide)");
    await page.getByRole("button", { name: "Files" }).click();
    await page.getByRole("complementary", { name: "Workspace files" }).getByRole("button", { name: "CLAUDE.md" }).waitFor(WAIT);
    await accessible("the files panel");
    await page.getByRole("button", { name: "Files" }).click();
    await page.goto(`${url}/#/loops`);
    await page.getByRole("heading", { name: "Loops" }).waitFor(WAIT);
    await accessible("the loop list");
    await page.goto(`${url}/#/settings`);
    await page.getByRole("heading", { name: "Settings" }).waitFor(WAIT);
    await accessible("the settings");
    await page.emulateMedia({ colorScheme: "dark" });
    await accessible("the settings (dark)");
    await page.emulateMedia({ colorScheme: "light" });
    await page.setViewportSize({ width: 1000, height: 760 });
  });

  await step("docs-screenshots", async () => {
    await page.setViewportSize({ width: 1280, height: 800 });
    await page.goto(`${url}/#/loop/${encodeURIComponent(loopId)}`);
    await page.getByRole("heading", { name: "Browser test" }).waitFor(WAIT);
    await send("/tool git log --oneline -3");
    await lastTurn().locator(".md", { hasText: "git log" }).waitFor(WAIT);
    await lastTurn().locator("details.tool summary", { hasText: "git log" }).click();
    await send("/think Let me check what deploying involves.\n\nI'll **deploy** it.");
    await lastTurn().locator(".md strong").waitFor(WAIT);
    await send("/permission ./deploy.sh --env production");
    await page.getByRole("button", { name: "Allow" }).waitFor(WAIT);
    await page.evaluate(() => window.scrollTo(0, document.body.scrollHeight));
    await page.screenshot({ path: join(shots, "chat-light.png") });
    await page.emulateMedia({ colorScheme: "dark" });
    await page.screenshot({ path: join(shots, "chat-dark.png") });
    await page.emulateMedia({ colorScheme: "light" });
    await page.getByRole("button", { name: "Allow" }).click();
    await lastTurn().getByText("Allowed (from the web)").waitFor(WAIT);
    await page.setViewportSize({ width: 1000, height: 760 });
  });

  await step("logout", async () => {
    await page.getByRole("button", { name: "Log out" }).click();
    await page.getByRole("button", { name: "Log in" }).waitFor(WAIT);
  });

  if (problems.length) throw new Error(problems.join("\n"));
  console.log(`web chat: all ${n} steps ok`);
} catch (e) {
  console.log("FAILED");
  await page.screenshot({ path: join(shots, "failure.png"), fullPage: true }).catch(() => {});
  console.error(e.stack || String(e));
  if (problems.length) console.error(problems.join("\n"));
  await context.close();
  process.exit(1);
}
await context.close();
