// Opens a kiln report in headless Chromium (playwright-core driving the system's chromium) and
// prints what the page did as one JSON line: console errors, page errors, SVG charts and their
// drawn paths, the body's text length; keeps a full-page screenshot.
//   node check_report.js REPORT.html SCREENSHOT.png CHROMIUM_PATH
const { chromium } = require("playwright-core");

(async () => {
  const [report, shot, executablePath] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
  const page = await browser.newPage();
  const errors = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("requestfailed", (r) => errors.push(`request failed: ${r.url()}`));
  await page.goto("file://" + report, { waitUntil: "load" });
  const figures = await page.$$eval("figure", (fs) => fs.map((f) => {
    const svg = f.querySelector("svg");
    const box = svg ? svg.getBoundingClientRect() : null;
    return { id: f.id, svg: !!svg, paths: svg ? svg.querySelectorAll("path").length : 0,
             width: box ? box.width : 0, height: box ? box.height : 0 };
  }));
  const tables = await page.$$eval("table", (ts) => ts.length);
  const text = await page.evaluate(() => document.body.innerText.length);
  const title = await page.title();
  await page.screenshot({ path: shot, fullPage: true });
  await browser.close();
  console.log(JSON.stringify({ title, errors, figures, tables, text }));
})().catch((e) => { console.error(String(e)); process.exit(1); });
