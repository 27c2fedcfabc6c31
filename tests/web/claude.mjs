// The web chat in a real browser with the real Claude Code CLI behind the
// loop (against the tests' mock model API): a Write the agent asks for is
// allowed from the page, its row shows the file and its content, and the
// files panel shows the file it wrote. Run by tests/it/web.rs.
import { chromium } from "playwright-core";
import { mkdtempSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const url = process.env.LOOPD_URL;
const loopId = process.env.LOOPD_LOOP;
const shots = process.env.SHOTS_DIR;
mkdirSync(shots, { recursive: true });
const WAIT = { timeout: 30000 };

const context = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "loopd-chromium-")), {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
  viewport: { width: 1280, height: 800 },
});
const page = context.pages()[0] || (await context.newPage());
const problems = [];
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
page.on("console", (m) => {
  if (m.type() === "error" && !/status of 401/.test(m.text())) problems.push(`console error: ${m.text()}`);
});

try {
  await page.goto(`${url}/#/login`);
  await page.getByLabel("Username").fill(process.env.LOOPD_USER);
  await page.getByLabel("Password").fill(process.env.LOOPD_PASSWORD);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.getByRole("heading", { name: "Loops" }).waitFor(WAIT);
  await page.goto(`${url}/#/loop/${encodeURIComponent(loopId)}`);
  await page.getByRole("heading", { name: "claude" }).waitFor(WAIT);

  const box = page.getByRole("textbox", { name: "Message" });
  await box.fill("[[write:from-claude.txt|written by the real CLI]]");
  await box.press("Enter");
  await page.getByRole("button", { name: "Allow" }).click(WAIT);
  const turn = page.locator("article.turn").last();
  await turn.locator(".status .usage").waitFor(WAIT);
  const row = turn.locator("details.tool", { hasText: "Write" });
  await row.locator("summary").click();
  await row.locator(".path", { hasText: "from-claude.txt" }).waitFor(WAIT);
  await row.locator("pre", { hasText: "written by the real CLI" }).waitFor(WAIT);
  await row.locator(".tool-output pre").waitFor(WAIT);
  await page.screenshot({ path: join(shots, "claude-write.png") });

  await page.getByRole("button", { name: "Files" }).click();
  const panel = page.getByRole("complementary", { name: "Workspace files" });
  await panel.getByRole("button", { name: "from-claude.txt" }).click(WAIT);
  await panel.getByLabel("Content of from-claude.txt").getByText("written by the real CLI").waitFor(WAIT);
  await page.screenshot({ path: join(shots, "claude-files.png") });
  if (problems.length) throw new Error(problems.join("\n"));
  console.log("claude web chat: all steps passed");
} finally {
  await context.close();
}
