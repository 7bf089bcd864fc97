/**
 * The multipart prediction (src/api/streaming-multipart.ts): where the file part's content starts in a body,
 * found from its first bytes however they are split into chunks, for bodies the platform's FormData serializes.
 */
import { describe, expect, it } from 'vitest';
import { BodyPrefix, boundaryOf } from '../../src/api/streaming-multipart.js';

async function serialized(fields: Array<[string, string]>, file: Buffer): Promise<{ body: Buffer; boundary: string; start: number }> {
  const fd = new FormData();
  for (const [k, v] of fields) fd.append(k, v);
  fd.append('file', new Blob([file]), 'disk "a".qcow2');
  const res = new Response(fd);
  const body = Buffer.from(await res.arrayBuffer());
  const boundary = boundaryOf(res.headers.get('content-type') ?? '');
  if (boundary === undefined) throw new Error('no boundary');
  // The file's bytes are unique in these bodies: their position is where the content starts.
  return { body, boundary, start: body.indexOf(file) };
}

describe('multipart prediction', () => {
  it('reads the boundary parameter, quoted or not, and refuses what is not one', () => {
    expect(boundaryOf('multipart/form-data; boundary=----abc123')).toBe('----abc123');
    expect(boundaryOf('multipart/form-data; boundary="a b:c"; charset=utf-8')).toBe('a b:c');
    expect(boundaryOf('multipart/form-data; charset=utf-8; BOUNDARY=xyz')).toBe('xyz');
    expect(boundaryOf('multipart/form-data')).toBeUndefined();
    expect(boundaryOf(`multipart/form-data; boundary=${'x'.repeat(71)}`)).toBeUndefined();
    expect(boundaryOf(undefined)).toBeUndefined();
  });

  it('finds the file content after any number of fields, with every chunking, and predicts the file size from the body length', async () => {
    const file = Buffer.from('QFI\xfb' + 'file-bytes-'.repeat(300), 'latin1');
    for (const fields of [[], [['source_format', 'auto']], [['source_format', 'qcow2'], ['expected_sha256', 'ab'.repeat(32)], ['glance', '{"name":"x\r\n\r\ny"}']]] as Array<Array<[string, string]>>) {
      const { body, boundary, start } = await serialized(fields, file);
      expect(body.length - start - (boundary.length + 8)).toBe(file.length);
      for (const size of [1, 7, 64, body.length]) {
        const prefix = new BodyPrefix(1 << 20);
        let found: number | undefined;
        for (let at = 0; at < body.length && found === undefined; at += size) {
          prefix.onData(body.subarray(at, at + size));
          found = prefix.contentStart(boundary, fields.length);
        }
        expect(found, `${fields.length} fields, chunks of ${size}`).toBe(start);
      }
    }
  });

  it('a preamble before the first delimiter is skipped; a part not yet in the kept bytes is not guessed', () => {
    const b = 'XyZ';
    const body = Buffer.from(`preamble\r\n--${b}\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--${b}\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\nDATA\r\n--${b}--\r\n`);
    const prefix = new BodyPrefix(1 << 20);
    prefix.onData(body.subarray(0, 40));
    expect(prefix.contentStart(b, 1)).toBeUndefined();
    prefix.onData(body.subarray(40));
    expect(prefix.contentStart(b, 1)).toBe(body.indexOf('DATA'));
    // Past its limit nothing more is kept: never found.
    const small = new BodyPrefix(16);
    small.onData(body.subarray(0, 16));
    small.onData(body.subarray(16));
    expect(small.contentStart(b, 1)).toBeUndefined();
  });
});
