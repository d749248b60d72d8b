// The OHIF viewer v3 against vna, in headless Chromium (Debian's /usr/bin/chromium via playwright-core).
//
//   node ohif.mjs '{"base": "http://127.0.0.1:PORT", "out": "/tmp/dir",
//                   "studies": [{"uid": "1.2...", "texts": ["Vna, Synthetic CT", "vna e2e CT"], "name": "ct"}, ...]}'
//
// 1. The study list (/) shows a row for every study (each of its `texts` is visible).
// 2. /viewer?StudyInstanceUIDs=UID shows the study: the viewport's canvas gets non-black pixels, and
//    one mouse-wheel step shows another image (the next slice, or the next frame of a multi-frame).
// 3. No DICOMweb or WADO-URI request fails (status >= 400), except a thumbnail 404, which OHIF tolerates.
// Prints every DICOMweb request, and a line `SCREENSHOT {"study", "path", "box"}` per viewer screenshot
// (box: the canvas, in screenshot pixels); "OK" at the end, or exits 1 after "FAIL: <why>".
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const WAIT_MS = 60_000;
const { base, out, studies } = JSON.parse(process.argv[2]);
mkdirSync(out, { recursive: true });

const requests = []; // {method, url, status, ms}
const problems = [];
// settles (rejects) at the first failed archive request, so that waits stop early instead of timing out
let reportProblem;
const problem = new Promise((_, reject) => { reportProblem = reject; });
problem.catch(() => {});
const noProblem = async () => {
  if (problems.length) throw new Error(`failed DICOMweb requests:\n  ${problems.join('\n  ')}`);
};
const waitVisible = (locator, what) => Promise.race([
  locator.waitFor({ state: 'visible', timeout: WAIT_MS }).catch(() => { throw new Error(`${what} not visible`); }),
  problem.catch(noProblem),
]);
const addProblem = text => { problems.push(text); reportProblem(new Error(text)); };
const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
const isArchive = url => { const p = new URL(url).pathname; return p.startsWith('/dicomweb/') || p === '/wado'; };

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  chromiumSandbox: false, // root in a container: --no-sandbox
  timeout: WAIT_MS,
  // Playwright gives every launch a fresh temporary --user-data-dir. The network is closed:
  // keep Chromium from calling home. SwiftShader renders WebGL on the CPU.
  args: ['--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--enable-unsafe-swiftshader'],
});
let failed = false;
let page;
try {
  page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(WAIT_MS);
  const started = new Map();
  page.on('request', r => started.set(r, Date.now()));
  page.on('response', r => {
    if (!isArchive(r.url())) return;
    const entry = { method: r.request().method(), url: r.url(), status: r.status(),
                    ms: Date.now() - (started.get(r.request()) ?? Date.now()) };
    requests.push(entry);
    const thumbnail404 = r.status() === 404 && /\/thumbnail(\?|$)/.test(new URL(r.url()).pathname + '?');
    if (r.status() >= 400 && !thumbnail404) addProblem(`${entry.method} ${entry.url} -> ${entry.status}`);
  });
  page.on('requestfailed', r => {
    // ERR_ABORTED: the page cancelled it (leaving a study with prefetches in flight), not a server fault
    const why = r.failure()?.errorText ?? '';
    if (isArchive(r.url()) && !why.includes('ERR_ABORTED')) addProblem(`${r.method()} ${r.url()} failed: ${why}`);
  });
  page.on('console', m => { if (m.type() === 'error') log('console error:', m.text().slice(0, 300)); });
  page.on('pageerror', e => log('page error:', String(e).slice(0, 300)));

  // 1. The study list.
  await page.goto(`${base}/`, { waitUntil: 'domcontentloaded' });
  for (const study of studies) {
    for (const text of study.texts) {
      await waitVisible(page.getByText(text, { exact: true }).first(), `study list: "${text}" (study ${study.uid})`);
    }
  }
  const listShot = join(out, 'study-list.png');
  await page.screenshot({ path: listShot });
  log(`study list shows ${studies.length} studies; screenshot ${listShot}`);

  // 2. Each study in the viewer.
  for (const study of studies) {
    await page.goto(`${base}/viewer?StudyInstanceUIDs=${study.uid}`, { waitUntil: 'domcontentloaded' });
    const canvas = page.locator('canvas.cornerstone-canvas').first();
    await waitVisible(canvas, `viewer ${study.name}: the cornerstone canvas`);
    let stats = null;
    const deadline = Date.now() + WAIT_MS;
    while (Date.now() < deadline) {
      await noProblem();
      stats = await canvas.evaluate(canvasStats);
      if (stats.nonBlack > 0.01 * stats.pixels && stats.levels >= 3) break;
      await page.waitForTimeout(500);
    }
    const shot = join(out, `viewer-${study.name}.png`);
    await page.screenshot({ path: shot });
    log(`viewer ${study.name}: canvas ${JSON.stringify(stats)}; screenshot ${shot}`);
    // for the caller's own look at the screenshot: where the viewport's canvas is on it
    console.log(`SCREENSHOT ${JSON.stringify({ study: study.uid, path: shot, box: await canvas.boundingBox() })}`);
    if (!(stats && stats.nonBlack > 0.01 * stats.pixels && stats.levels >= 3)) {
      throw new Error(`viewer ${study.name}: the canvas stayed black ${JSON.stringify(stats)}`);
    }
    // Scroll one image on: the canvas must show another image (the next slice or frame), not black.
    const box = await canvas.boundingBox();
    await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
    await page.mouse.wheel(0, 120);
    let scrolled = null;
    const scrollDeadline = Date.now() + WAIT_MS;
    while (Date.now() < scrollDeadline) {
      await noProblem();
      scrolled = await canvas.evaluate(canvasStats);
      if (scrolled.hash !== stats.hash && scrolled.nonBlack > 0.01 * scrolled.pixels) break;
      await page.waitForTimeout(250);
    }
    const shot2 = join(out, `viewer-${study.name}-scrolled.png`);
    await page.screenshot({ path: shot2 });
    log(`viewer ${study.name} after one wheel step: canvas ${JSON.stringify(scrolled)}; screenshot ${shot2}`);
    if (!(scrolled.hash !== stats.hash && scrolled.nonBlack > 0.01 * scrolled.pixels)) {
      throw new Error(`viewer ${study.name}: scrolling did not show another image ${JSON.stringify(scrolled)}`);
    }
    const frames = requests.filter(r => r.url.includes(study.uid) && /\/frames\/\d+/.test(r.url) && r.status === 200);
    log(`viewer ${study.name}: ${frames.length} frame requests answered 200`);
    if (frames.length === 0) throw new Error(`viewer ${study.name}: no frames were retrieved`);
  }
  await noProblem();
} catch (err) {
  failed = true;
  console.log(`FAIL: ${err.message}`);
  const shot = join(out, 'failure.png');
  await page?.screenshot({ path: shot }).then(() => console.log(`screenshot at failure: ${shot}`), () => {});
} finally {
  console.log(`DICOMweb requests (${requests.length}):`);
  for (const r of requests) console.log(`  ${r.status} ${r.method} ${r.url} ${r.ms}ms`);
  await browser.close();
}
if (!failed) console.log('OK');
process.exit(failed ? 1 : 0);

// Runs in the page: how many pixels of the viewport's 2D canvas are not black, and how many grey
// levels. cornerstone3D draws each viewport onto such a 2D canvas (from its WebGL or CPU renderer).
function canvasStats(canvas) {
  let ctx = canvas.getContext('2d', { willReadFrequently: true });
  let source = canvas;
  if (!ctx) { // a WebGL canvas: copy it onto a 2D one
    source = document.createElement('canvas');
    source.width = canvas.width; source.height = canvas.height;
    ctx = source.getContext('2d');
    ctx.drawImage(canvas, 0, 0);
  }
  const { data } = ctx.getImageData(0, 0, source.width, source.height);
  let nonBlack = 0;
  let hash = 0;
  const levels = new Set();
  for (let i = 0; i < data.length; i += 4) {
    const v = Math.max(data[i], data[i + 1], data[i + 2]);
    if (v > 16) nonBlack++;
    levels.add(v >> 4);
    hash = (Math.imul(hash, 31) + v) | 0;
  }
  return { width: source.width, height: source.height, pixels: data.length / 4, nonBlack, levels: levels.size, hash };
}
