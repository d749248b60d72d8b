// Puts the built OHIF viewer (npm @ohif/app, its dist/ only) under node_modules/@ohif/app.
//
// Why not a dependency: @ohif/app's package.json lists ~40 build-time dependencies (webpack loaders,
// the @ohif/* sources) that the shipped dist/ does not need, and some of them are not on every
// registry mirror. `npm pack` fetches just the tarball; we check it against the integrity pinned
// in package.json ("ohif") and unpack it. Runs as the postinstall of `npm ci`.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const { package: spec, integrity } = JSON.parse(readFileSync(join(here, 'package.json'), 'utf8')).ohif;
const target = join(here, 'node_modules', '@ohif', 'app');
const stamp = join(target, '.vna-integrity');

if (existsSync(stamp) && readFileSync(stamp, 'utf8') === integrity) {
  process.exit(0);
}
const work = mkdtempSync(join(tmpdir(), 'ohif-'));
try {
  const [packed] = JSON.parse(execFileSync('npm', ['pack', spec, '--json', '--pack-destination', work],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }));
  if (packed.integrity !== integrity) {
    throw new Error(`${spec}: integrity ${packed.integrity}, package.json pins ${integrity}`);
  }
  rmSync(target, { recursive: true, force: true });
  mkdirSync(target, { recursive: true });
  execFileSync('tar', ['-xzf', join(work, packed.filename), '-C', target, '--strip-components=1']);
  writeFileSync(stamp, integrity);
  console.log(`fetch-ohif: ${spec} -> ${target}`);
} finally {
  rmSync(work, { recursive: true, force: true });
}
