import type { CheckReport } from '../engine/types.js';
import type { QemuInfoJson } from '../engine/index.js';

export function humanSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${bytes} B` : `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${units[u]}`;
}

/** Close to qemu-img's human `info` output. */
export function formatHumanInfo(info: QemuInfoJson): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${humanSize(info['virtual-size'])} (${info['virtual-size']} bytes)`,
  ];
  if (info['actual-size'] !== undefined) lines.push(`disk size: ${humanSize(info['actual-size'])}`);
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size']}`);
  if (info.encrypted) lines.push('encrypted: yes');
  if (info['backing-filename']) lines.push(`backing file: ${info['backing-filename']}`);
  if (info.snapshots?.length) {
    lines.push('Snapshot list:', 'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT');
    for (const s of info.snapshots as Array<Record<string, number | string>>) {
      const date = new Date(Number(s['date-sec']) * 1000).toISOString().replace('T', ' ').slice(0, 19);
      lines.push(`${String(s.id).padEnd(10)}${String(s.name).padEnd(18)}${humanSize(Number(s['vm-state-size'])).padStart(7)} ${date}`);
    }
  }
  const fs = info['format-specific'];
  if (fs) {
    lines.push('Format specific information:');
    for (const [k, v] of Object.entries(fs.data)) {
      lines.push(`    ${k.replace(/-/g, ' ')}: ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`);
    }
  }
  return lines.join('\n');
}

export function formatHumanCheck(report: CheckReport): string {
  const lines = [...report.messages];
  if (report.corruptions === 0 && report.leaks === 0 && report.checkErrors === 0) lines.push('No errors were found on the image.');
  else {
    if (report.corruptions) lines.push(`${report.corruptions} errors were found on the image.`);
    if (report.leaks) lines.push(`${report.leaks} leaked clusters were found on the image.`);
  }
  for (const [k, v] of Object.entries(report.fields)) lines.push(`${k}: ${v}`);
  return lines.join('\n');
}
