// Builds further-link's page from src/ and the locked npm packages into the
// files the Python package serves (further_link/web/ by default, or the
// folder given as the first argument). The output depends only on the sources
// and package-lock.json: the same inputs give the same bytes.
//
//   npm ci && node build.mjs [outdir]

import { build } from "esbuild";
import { copyFileSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const outdir = resolve(process.argv[2] ?? join(here, "..", "further_link", "web"));
const STATIC = ["index.html", "favicon.svg"];
const LICENSE_FILES = /^(licen[cs]e|copying)(\.(md|txt))?$/i;

mkdirSync(outdir, { recursive: true });
for (const name of readdirSync(outdir)) {
  if (name !== "__init__.py") rmSync(join(outdir, name), { recursive: true });
}

const common = {
  bundle: true,
  minify: true,
  metafile: true,
  legalComments: "none", // the licences are in LICENSES.txt beside the bundle
  logLevel: "warning",
  absWorkingDir: here,
};
const scripts = await build({
  ...common,
  entryPoints: ["src/app.js"],
  outfile: join(outdir, "app.js"),
  format: "esm",
  target: ["chrome100", "firefox100", "safari15"],
});
const styles = await build({
  ...common,
  entryPoints: ["src/style.css"],
  outfile: join(outdir, "app.css"),
  target: ["chrome100", "firefox100", "safari15"],
});
for (const name of STATIC) copyFileSync(join(here, "src", name), join(outdir, name));

// The licence of every npm package whose code is in the bundle.
const packages = new Map();
for (const input of [
  ...Object.keys(scripts.metafile.inputs),
  ...Object.keys(styles.metafile.inputs),
]) {
  const match = input.match(/^node_modules\/((?:@[^/]+\/)?[^/]+)\//);
  if (match) packages.set(match[1], join(here, "node_modules", match[1]));
}
const sections = [
  "The built-in page of further-link bundles these npm packages (versions from",
  "web/package-lock.json). Their licences follow.",
  "",
];
for (const name of [...packages.keys()].sort()) {
  const folder = packages.get(name);
  const manifest = JSON.parse(readFileSync(join(folder, "package.json"), "utf8"));
  const licence = readdirSync(folder).filter((file) => LICENSE_FILES.test(file)).sort()[0];
  if (!licence) throw new Error(`${name} ships no licence file: check its terms before bundling it`);
  sections.push("=".repeat(78));
  sections.push(`${name} ${manifest.version} (${manifest.license ?? "see below"})`);
  sections.push("=".repeat(78));
  sections.push(readFileSync(join(folder, licence), "utf8").trimEnd(), "");
}
writeFileSync(join(outdir, "LICENSES.txt"), `${sections.join("\n")}\n`);
