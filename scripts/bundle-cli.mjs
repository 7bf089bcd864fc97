#!/usr/bin/env node
// The build's last step: the image verbs as one CommonJS file with a V8 code cache (why: src/cli/launch.cts).
//
// Input is the compiled dist/cli/main.js, not src/, so the bundle holds exactly the code tsc emitted; its
// manifest stamps every module it took, and the launcher runs main.js instead whenever one has changed.
// esbuild (a dev dependency, already in the tree through vite) does the bundling; without it this step says
// so and the CLI runs from main.js as before.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const dist = join(root, 'dist');
const require = createRequire(import.meta.url);
const launch = require(join(dist, 'cli', 'launch.cjs'));

// A manifest left from an earlier build would vouch for a bundle this run may not finish.
rmSync(launch.BUNDLE_MANIFEST, { force: true });

let esbuild;
try {
  esbuild = await import('esbuild');
} catch {
  console.log('bundle-cli: esbuild is not installed; the CLI runs from dist/cli/main.js');
  process.exit(0);
}

const SERVICE_DIRS = ['api', 'queue', 'store', 'publish'].map((d) => join(dist, d) + sep);

/** import.meta.url becomes the URL of the module's own file under dist/, as it was before bundling. */
const moduleUrlPlugin = {
  name: 'module-url',
  setup(build) {
    build.onLoad({ filter: /\.js$/ }, (args) => {
      const rel = relative(dist, args.path).split(sep).join('/');
      let contents = readFileSync(args.path, 'utf8');
      contents = contents.replaceAll('import.meta.url', `__diskconvModuleUrl(${JSON.stringify(rel)})`);
      return { contents, loader: 'js' };
    });
    // The service verbs never run from the bundle (the launcher sends them to main.js): leave their code out.
    build.onResolve({ filter: /^\.\/service\.js$/ }, (args) =>
      args.importer === join(dist, 'cli', 'main.js') ? { path: 'service', namespace: 'service-stub' } : undefined,
    );
    build.onLoad({ filter: /.*/, namespace: 'service-stub' }, () => ({
      contents: "export async function runService() { throw new Error('the service verbs run from dist/cli/main.js, not the image-verbs bundle'); }",
      loader: 'js',
    }));
  },
};

const result = await esbuild.build({
  entryPoints: [join(dist, 'cli', 'main.js')],
  outfile: launch.BUNDLE,
  bundle: true,
  format: 'cjs',
  platform: 'node',
  target: 'node20',
  packages: 'external',
  keepNames: true,
  metafile: true,
  logLevel: 'warning',
  banner: {
    js: "const __diskconvModuleUrl = (rel) => require('node:url').pathToFileURL(require('node:path').join(__dirname, '..', rel)).href;",
  },
  plugins: [moduleUrlPlugin],
});

const inputs = Object.keys(result.metafile.inputs).filter((p) => !p.startsWith('service-stub:'));
const absolute = inputs.map((p) => resolve(root, p));
const service = absolute.filter((p) => SERVICE_DIRS.some((d) => p.startsWith(d)));
if (service.length > 0) throw new Error(`bundle-cli: service code reached the image-verbs bundle: ${service.join(', ')}`);
const outside = absolute.filter((p) => !p.startsWith(dist + sep));
if (outside.length > 0) throw new Error(`bundle-cli: inputs outside dist/: ${outside.join(', ')}`);
const source = readFileSync(launch.BUNDLE, 'utf8');
if (source.includes('import.meta')) throw new Error('bundle-cli: import.meta remains in the bundle');
// vm.Script has no module loader: a dynamic import() left in the bundle would fail when reached.
const output = Object.values(result.metafile.outputs)[0];
const dynamic = output.imports.filter((i) => i.kind === 'dynamic-import');
if (dynamic.length > 0) throw new Error(`bundle-cli: dynamic imports remain: ${dynamic.map((i) => i.path).join(', ')}`);

// Warm-up: run the verbs in this process on small images, so the code cache holds compiled code for what an
// image verb runs, not only its top level. Raw is made here; the other formats where qemu-img is at hand.
const { script, exports } = launch.runBundle(source);
const work = mkdtempSync(join(tmpdir(), 'diskconv-bundle-'));
const discard = () => {};
const failures = [];
async function verb(...argv) {
  const code = await exports.runCli(argv, discard);
  if (code !== 0) failures.push(`${argv.join(' ')} exited ${code}`);
}
try {
  const images = [join(work, 'warm.raw')];
  await verb('create', '-q', '-f', 'raw', images[0], '4M');
  for (const fmt of ['qcow2', 'vmdk', 'vdi', 'vpc', 'vhdx']) {
    const image = join(work, `warm.${fmt}`);
    const made = spawnSync('qemu-img', ['convert', '-f', 'raw', '-O', fmt, images[0], image], { stdio: 'ignore' });
    if (made.status === 0) images.push(image);
  }
  for (const image of images) {
    const out = `${image}.out`;
    await verb('info', image);
    await verb('info', '--output=json', image);
    await verb('map', '--output=json', image);
    await verb('measure', '-O', 'raw', image);
    // qemu-img checks only these (the others exit 63, 'not supported').
    if (/\.(qcow2|vmdk|vdi|vhdx)$/.test(image)) await verb('check', image);
    await verb('convert', '-O', 'raw', image, out);
    await verb('convert', '-m', '16', '-W', '-O', 'raw', image, out);
    await verb('compare', image, out);
    rmSync(out);
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}
if (failures.length > 0) throw new Error(`bundle-cli: warm-up failed: ${failures.join('; ')}`);

writeFileSync(launch.BUNDLE_CACHE, script.createCachedData());
const manifest = {
  node: process.version,
  bundle: launch.stampOf(launch.BUNDLE),
  cache: launch.stampOf(launch.BUNDLE_CACHE),
  inputs: Object.fromEntries(absolute.map((p) => [relative(dist, p).split(sep).join('/'), launch.stampOf(p)])),
};
writeFileSync(launch.BUNDLE_MANIFEST, JSON.stringify(manifest, null, 1) + '\n');
console.log(`bundle-cli: ${relative(root, launch.BUNDLE)} (${inputs.length} modules, ${source.length >> 10} KiB, code cache ${manifest.cache.size >> 10} KiB)`);
// Decoder workers or timers the warm-up started must not keep the build waiting.
process.exit(0);
