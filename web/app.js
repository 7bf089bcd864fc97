// The diskconv page: plain ES module, no dependencies, no build step.
// It talks to the API it is served by (same origin); a token, when the service
// needs one, stays in sessionStorage and travels only in the Authorization header.

const TOKEN_KEY = 'diskconv.token';
const MAX_STREAMS = 4; // browsers allow ~6 connections per host; keep room for requests
const $ = (id) => document.getElementById(id);

/** What a refusal means, in words a person understands; the code is shown next to it. */
const EXPLAIN = {
  IMAGE_CORRUPT: 'The image is damaged or cut short: its tables point outside the file or contradict each other.',
  UNSAFE_IMAGE: 'The image was refused for safety: it refers to another file (a backing file, an external data file or a parent disk), or it looks like two formats at once. Nothing it names is ever opened.',
  UNSUPPORTED_FEATURE: 'The image uses a feature this service does not convert (for example encryption).',
  UNSUPPORTED_FORMAT: 'This disk image format is not supported.',
  FORMAT_MISMATCH: 'The source format you chose does not match the file. Choose “Detect from the bytes”.',
  LIMIT_EXCEEDED: 'The image is larger or more complex than this service allows.',
  CHECKSUM_MISMATCH: 'The bytes do not match the sha256 you gave.',
  URL_REFUSED: 'The service may not fetch this URL (a private or loopback address, a port or scheme that is not allowed).',
  URL_FETCH_FAILED: 'The URL could not be fetched.',
  SOURCE_UNAVAILABLE: 'The source could not be read; the service retried and gave up.',
  SOURCE_TOO_LARGE: 'The image is larger than this service accepts.',
  PAYLOAD_TOO_LARGE: 'The file is larger than this service accepts.',
  INSUFFICIENT_SPACE: 'The service does not have room for this image right now.',
  UNAUTHORIZED: 'That token was not accepted. Check it and try again.',
  RATE_LIMITED: 'Too many requests in a short time; wait a moment and try again.',
  VALIDATION_FAILED: 'A field is missing or invalid.',
  WORKER_LOST: 'The conversion was interrupted too many times.',
  WRONG_PASSPHRASE: 'The passphrase does not unlock this encrypted image.',
  DESTINATION_REFUSED: 'This service may not write into that RBD pool.',
  DESTINATION_EXISTS: 'An RBD image of that name already exists; it was left as it was.',
  DESTINATION_UNAVAILABLE: 'The Ceph cluster could not be reached; the service retried and gave up.',
  GLANCE_NOT_CONFIGURED: 'This service does not publish into Glance.',
  GLANCE_REFUSED: 'Glance refused the image (for example a name, visibility or property it does not allow). The converted image can still be downloaded here.',
  GLANCE_UNAVAILABLE: 'Glance could not be reached; the service retried and gave up. The converted image can still be downloaded here.',
  INTERNAL_ERROR: 'Something went wrong inside the service.',
};

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  service: null,
  jobs: new Map(), // id -> job JSON
  streams: new Map(), // id -> AbortController
  links: new Map(), // id -> { href, expires }
};

function headers(extra = {}) {
  const h = { ...extra };
  if (state.token) h.authorization = `Bearer ${state.token}`;
  return h;
}

async function api(path, init = {}) {
  const res = await fetch(path, { ...init, headers: headers(init.headers) });
  if (res.status === 401) {
    askForToken(state.token ? 'That token was not accepted. Check it and try again.' : '');
    throw new ProblemError({ code: 'UNAUTHORIZED', detail: 'a token is required' });
  }
  return res;
}

class ProblemError extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || problem.code);
    this.code = problem.code || 'INTERNAL_ERROR';
    this.detail = problem.detail || problem.title || '';
  }
}

async function problemOf(res) {
  try {
    const body = await res.json();
    return new ProblemError(body);
  } catch {
    return new ProblemError({ code: 'INTERNAL_ERROR', detail: `HTTP ${res.status}` });
  }
}

/** A refusal as a node: the code, what it means, and the service's own detail. */
function describeProblem(code, detail) {
  const wrap = document.createElement('p');
  const strong = document.createElement('strong');
  strong.textContent = code;
  wrap.append(strong, ` — ${EXPLAIN[code] || 'The request failed.'}`);
  if (detail) {
    const d = document.createElement('span');
    d.className = 'detail';
    d.textContent = ` (${detail})`;
    wrap.append(d);
  }
  return wrap;
}

function showFormError(err) {
  const box = $('form-error');
  box.replaceChildren();
  if (err) box.append(describeProblem(err.code || 'INTERNAL_ERROR', err.detail || String(err.message || err)));
}

function setStatus(text) {
  $('form-status').textContent = text;
}

const UNITS = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
function size(n) {
  if (n === null || n === undefined) return '—';
  let v = n;
  let i = 0;
  while (v >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i++;
  }
  const short = i === 0 ? `${n} bytes` : `${v.toFixed(v < 10 && v !== Math.floor(v) ? 1 : 0)} ${UNITS[i]}`;
  return i === 0 ? short : `${short} (${n} bytes)`;
}

// --- token -----------------------------------------------------------------

function askForToken(message) {
  $('loading').hidden = true;
  $('app').hidden = true;
  $('token-section').hidden = false;
  $('token-error').textContent = message || '';
  $('token').focus();
}

$('token-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  state.token = $('token').value.trim();
  $('token').value = '';
  sessionStorage.setItem(TOKEN_KEY, state.token);
  await start();
});

// --- start -------------------------------------------------------------------

async function start() {
  let res;
  try {
    res = await api('/v1/service');
  } catch {
    return; // askForToken has been shown
  }
  if (!res.ok) {
    $('loading').textContent = 'The service is not answering properly; try again later.';
    return;
  }
  state.service = await res.json();
  $('token-section').hidden = true;
  $('loading').hidden = true;
  $('app').hidden = false;
  const targets = state.service.targets || [];
  const select = $('target');
  select.replaceChildren(
    ...targets.map((t) => {
      const o = document.createElement('option');
      o.value = t.id;
      o.textContent = t.label;
      return o;
    }),
  );
  $('target-field').hidden = targets.length < 2;
  showRbdImage();
  $('glance-fields').hidden = !state.service.glance;
  await refresh();
}

// --- the form ------------------------------------------------------------------

const dropZone = $('drop-zone');
dropZone.addEventListener('dragover', (e) => {
  e.preventDefault();
  dropZone.classList.add('over');
});
dropZone.addEventListener('dragleave', () => dropZone.classList.remove('over'));
dropZone.addEventListener('drop', (e) => {
  e.preventDefault();
  dropZone.classList.remove('over');
  if (e.dataTransfer && e.dataTransfer.files.length > 0) {
    $('file').files = e.dataTransfer.files;
    setStatus(`Chosen: ${e.dataTransfer.files[0].name}`);
  }
});

/** The selected output target (the store when the service offers no other). */
function selectedTarget() {
  const id = $('target-field').hidden ? 'store' : $('target').value;
  return ((state.service && state.service.targets) || []).find((t) => t.id === id);
}

/** The image name field belongs to an RBD target only. */
function showRbdImage() {
  const target = selectedTarget();
  $('rbd-image-field').hidden = !(target && target.kind === 'rbd');
}
$('target').addEventListener('change', showRbdImage);

/**
 * Idempotency-Key of the job the form describes: made when the form is sent and
 * kept until the form changes or a job is created, so a double click or a retry
 * after a lost answer makes one job (the service answers a repeat with the same job).
 */
let idempotencyKey = '';
const forgetIdempotencyKey = () => (idempotencyKey = '');
$('image-form').addEventListener('input', forgetIdempotencyKey);
$('image-form').addEventListener('change', forgetIdempotencyKey);

/** What the form asks for, or a ProblemError for the person to fix. */
function readForm() {
  const file = $('file').files[0];
  const url = $('url').value.trim();
  const sha = $('sha256').value.trim();
  if (file && url) throw new ProblemError({ code: 'VALIDATION_FAILED', detail: 'choose a file or give a URL, not both' });
  if (!file && !url) throw new ProblemError({ code: 'VALIDATION_FAILED', detail: 'choose a file or give a URL' });
  if (sha && !/^[0-9a-fA-F]{64}$/.test(sha)) throw new ProblemError({ code: 'VALIDATION_FAILED', detail: 'the expected sha256 must be 64 hex digits' });
  const target = selectedTarget();
  const rbdImage = target && target.kind === 'rbd' ? $('rbd-image').value.trim() : '';
  if (rbdImage && !/^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/.test(rbdImage)) {
    throw new ProblemError({ code: 'VALIDATION_FAILED', detail: 'the RBD image name may have letters, digits, dots, dashes and underscores, and may not start with a dot or a dash' });
  }
  // Read from the field when sent, never kept anywhere else (not in sessionStorage, not in a URL).
  const passphrase = $('passphrase').value;
  let glance;
  if (!$('glance-fields').hidden && $('glance-publish').checked) {
    glance = {};
    const name = $('glance-name').value.trim();
    if (name) glance.name = name;
    if ($('glance-visibility').value) glance.visibility = $('glance-visibility').value;
  }
  return { file, url, sha, format: $('source-format').value, target, rbdImage, passphrase, glance };
}

/** POSTs with XMLHttpRequest, whose upload events give real progress while a file is sent. */
function send(method, path, body, contentType, onProgress, extra = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, path);
    for (const [k, v] of Object.entries(headers({ ...extra, ...(contentType ? { 'content-type': contentType } : {}) }))) xhr.setRequestHeader(k, v);
    xhr.responseType = 'json';
    if (onProgress) xhr.upload.addEventListener('progress', (e) => e.lengthComputable && onProgress(e.loaded, e.total));
    xhr.addEventListener('load', () => resolve({ status: xhr.status, body: xhr.response }));
    xhr.addEventListener('error', () => reject(new ProblemError({ code: 'INTERNAL_ERROR', detail: 'the connection failed' })));
    xhr.addEventListener('abort', () => reject(new ProblemError({ code: 'INTERNAL_ERROR', detail: 'the upload was aborted' })));
    xhr.send(body);
  });
}

function buildBody({ file, url, sha, format, target, rbdImage, passphrase, glance }) {
  const rbd = target && target.kind === 'rbd' ? target.pool : undefined;
  if (file) {
    const fd = new FormData();
    fd.append('source_format', format);
    if (sha) fd.append('expected_sha256', sha.toLowerCase());
    // Before the file part: a refused pool stops the upload before it is stored.
    if (rbd) {
      fd.append('output_target', 'rbd');
      fd.append('rbd_pool', rbd);
      if (rbdImage) fd.append('rbd_image', rbdImage);
    }
    if (glance) fd.append('glance', JSON.stringify(glance));
    if (passphrase) fd.append('passphrase', passphrase);
    fd.append('file', file, file.name);
    return { body: fd, contentType: undefined };
  }
  const json = { source: { url }, source_format: format };
  if (sha) json.expected_sha256 = sha.toLowerCase();
  if (rbd) json.output = { target: 'rbd', pool: rbd, ...(rbdImage ? { image: rbdImage } : {}) };
  if (glance) json.glance = glance;
  if (passphrase) json.passphrase = passphrase;
  return { body: JSON.stringify(json), contentType: 'application/json' };
}

function uploadProgress(loaded, total) {
  $('upload').hidden = false;
  const p = $('upload-progress');
  p.value = total ? Math.floor((100 * loaded) / total) : 0;
  setStatus(`Uploading… ${p.value}% (${size(loaded)} of ${size(total)})`);
}

async function submit(path) {
  showFormError(null);
  let input;
  try {
    input = readForm();
  } catch (err) {
    showFormError(err);
    return undefined;
  }
  const { body, contentType } = buildBody(input);
  const creating = path === '/v1/jobs';
  // getRandomValues, not randomUUID: the page may be served over plain http (not a secure context).
  if (creating && !idempotencyKey) idempotencyKey = [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, '0')).join('');
  $('convert').disabled = true;
  $('inspect').disabled = true;
  $('upload').hidden = !input.file;
  $('upload-progress').value = 0;
  setStatus(input.file ? 'Uploading…' : 'Sending…');
  try {
    const res = await send('POST', path, body, contentType, input.file ? uploadProgress : undefined, creating ? { 'idempotency-key': idempotencyKey } : {});
    if (res.status === 401) {
      askForToken('That token was not accepted. Check it and try again.');
      return undefined;
    }
    if (res.status >= 400) {
      const p = res.body || {};
      throw new ProblemError({ code: p.code, detail: p.detail || p.title });
    }
    return res.body;
  } catch (err) {
    setStatus('');
    showFormError(err);
    return undefined;
  } finally {
    $('convert').disabled = false;
    $('inspect').disabled = false;
  }
}

$('image-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const job = await submit('/v1/jobs');
  if (!job) return;
  setStatus(`Job created for ${jobName(job)}; it is ${job.state}.`);
  $('image-form').reset(); // the upload bar stays, at 100%, until the next submission; the passphrase goes
  forgetIdempotencyKey();
  showRbdImage();
  state.jobs.set(job.id, job);
  render();
  watch(job.id);
});

$('inspect').addEventListener('click', async () => {
  const result = await submit('/v1/inspect');
  if (!result) return;
  setStatus('Inspected.');
  const dl = $('inspection-details');
  const rows = [
    ['Format', result.format || '—'],
    ['Virtual size', size(result.virtual_size)],
  ];
  if (result.allocation) rows.push(['Data', size(result.allocation.data_bytes)]);
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    dl.append(dt, dd);
  }
  const dt = document.createElement('dt');
  dt.textContent = 'Verdict';
  const dd = document.createElement('dd');
  if (result.safe) {
    dd.textContent = 'Safe to convert';
    dd.className = 'state-succeeded';
  } else {
    const err = result.error || { code: 'INTERNAL_ERROR', message: '' };
    dd.className = 'error';
    dd.append(describeProblem(err.code, err.message));
  }
  dl.append(dt, dd);
  $('inspection').hidden = false;
});

// --- jobs ----------------------------------------------------------------------

const jobName = (job) => (job.source && (job.source.filename || job.source.url)) || job.id;

async function refresh() {
  let res;
  try {
    res = await api('/v1/jobs?limit=50');
  } catch {
    return;
  }
  if (!res.ok) return;
  const { jobs } = await res.json();
  state.jobs = new Map(jobs.map((j) => [j.id, j]));
  render();
  for (const job of jobs) if (!isFinal(job.state)) watch(job.id);
}
$('refresh').addEventListener('click', refresh);

const isFinal = (s) => s === 'succeeded' || s === 'failed' || s === 'cancelled';

/** Follows a job's event stream (fetch, so the token goes in a header, never the URL). */
function watch(id) {
  if (state.streams.has(id) || state.streams.size >= MAX_STREAMS) return;
  const controller = new AbortController();
  state.streams.set(id, controller);
  let lastId = '';
  const run = async () => {
    for (let tries = 0; tries < 20 && !controller.signal.aborted; tries++) {
      try {
        const res = await fetch(`/v1/jobs/${id}/events`, {
          headers: headers({ accept: 'text/event-stream', ...(lastId ? { 'last-event-id': lastId } : {}) }),
          signal: controller.signal,
        });
        if (!res.ok || !res.body) return;
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        let ev = { event: 'message', data: '', id: '' };
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let nl;
          while ((nl = buf.indexOf('\n')) >= 0) {
            const line = buf.slice(0, nl).replace(/\r$/, '');
            buf = buf.slice(nl + 1);
            if (line === '') {
              if (ev.data) onEvent(id, ev);
              if (ev.id) lastId = ev.id;
              ev = { event: 'message', data: '', id: '' };
            } else if (!line.startsWith(':')) {
              const i = line.indexOf(':');
              const field = i < 0 ? line : line.slice(0, i);
              const val = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
              if (field === 'data') ev.data += (ev.data ? '\n' : '') + val;
              else if (field === 'event') ev.event = val;
              else if (field === 'id') ev.id = val;
            }
          }
        }
        const job = state.jobs.get(id);
        if (!job || isFinal(job.state)) return;
      } catch {
        if (controller.signal.aborted) return;
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  };
  run().finally(() => {
    state.streams.delete(id);
    // Give a waiting job the freed slot.
    for (const job of state.jobs.values()) if (!isFinal(job.state) && !state.streams.has(job.id)) watch(job.id);
  });
}

function onEvent(id, ev) {
  let data;
  try {
    data = JSON.parse(ev.data);
  } catch {
    return;
  }
  const job = state.jobs.get(id);
  if (!job) return;
  if (ev.event === 'progress') {
    job.progress = data;
    updateProgress(job);
  } else if (ev.event === 'state' && data.job) {
    state.jobs.set(id, data.job);
    render();
  }
}

function updateProgress(job) {
  const li = document.getElementById(`job-${job.id}`);
  if (!li) return render();
  const bar = li.querySelector('progress');
  const text = li.querySelector('.progress-text');
  if (bar) bar.value = job.progress.percent ?? 0;
  if (text) text.textContent = progressText(job);
}

function progressText(job) {
  const p = job.progress || {};
  if (job.state === 'succeeded') return 'Done';
  if (job.state === 'failed' || job.state === 'cancelled') return '';
  if (p.phase === 'publishing') return 'Publishing into Glance';
  const pct = p.percent === null || p.percent === undefined ? '' : ` ${p.percent}%`;
  return `${p.phase || job.state}${pct}`;
}

async function linkFor(job) {
  if (!state.service || !state.service.auth) return `/v1/jobs/${job.id}/output`;
  const cached = state.links.get(job.id);
  if (cached && cached.expires - Date.now() > 60_000) return cached.href;
  const res = await api(`/v1/jobs/${job.id}/output/link`, { method: 'POST' });
  if (!res.ok) throw await problemOf(res);
  const body = await res.json();
  state.links.set(job.id, { href: body.href, expires: Date.parse(body.expires_at) });
  return body.href;
}

function render() {
  const list = $('jobs');
  const jobs = [...state.jobs.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  $('jobs-empty').hidden = jobs.length > 0;
  list.replaceChildren(...jobs.map(renderJob));
}

function renderJob(job) {
  const li = document.createElement('li');
  li.id = `job-${job.id}`;
  li.setAttribute('aria-labelledby', `job-${job.id}-name`);
  const head = document.createElement('div');
  head.className = 'job-head';
  const h = document.createElement('h3');
  h.id = `job-${job.id}-name`;
  h.textContent = jobName(job);
  const st = document.createElement('span');
  st.className = `state state-${job.state}`;
  st.textContent = job.state;
  st.setAttribute('aria-label', `State: ${job.state}`);
  head.append(h, st);
  li.append(head);

  if (!isFinal(job.state) || job.state === 'succeeded') {
    const label = document.createElement('label');
    label.htmlFor = `job-${job.id}-progress`;
    label.className = 'progress-text';
    label.setAttribute('aria-live', 'polite');
    label.textContent = progressText(job);
    const bar = document.createElement('progress');
    bar.id = `job-${job.id}-progress`;
    bar.max = 100;
    bar.value = job.state === 'succeeded' ? 100 : (job.progress && job.progress.percent) || 0;
    bar.setAttribute('aria-label', `Conversion progress of ${jobName(job)}`);
    li.append(label, bar);
  }

  const dl = document.createElement('dl');
  const src = job.source || {};
  const rows = [
    ['Detected format', src.format || '—'],
    ['Virtual size', size(src.virtual_size)],
    ['Output size', job.output ? size(job.output.size) : '—'],
    ['sha256', job.output ? job.output.sha256 : '—'],
  ];
  if (job.output && job.output.sha512) rows.push(['sha512', job.output.sha512]);
  if (job.output && job.output.md5) rows.push(['md5', job.output.md5]);
  const dest = job.destination || (job.output && job.output.target === 'rbd' ? job.output : undefined);
  if (dest && dest.target === 'rbd') {
    rows.push(['Output target', `Ceph RBD ${dest.pool}/${dest.image}${job.output && job.output.snapshot ? `@${job.output.snapshot}` : ''}`]);
  }
  if (job.output && job.output.location) rows.push(['Location', job.output.location]);
  if (job.glance) rows.push(['Glance request', [job.glance.name && `name ${job.glance.name}`, job.glance.visibility && `visibility ${job.glance.visibility}`].filter(Boolean).join(', ') || 'defaults']);
  const g = job.output && job.output.glance;
  if (g) {
    rows.push(['Glance image', g.image_id]);
    // A publishing that failed never says "uploaded": the image id is the one the service asked Glance for.
    const stopped = job.state === 'failed' && job.error && String(job.error.code).startsWith('GLANCE_') && g.status !== 'active';
    rows.push(['Glance status', stopped ? `not published (stopped while ${g.status})` : `${g.status} (${g.method === 'location' ? 'registered in place' : 'uploaded'})`]);
  }
  for (const [k, v] of rows) {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    if (k === 'sha256' || k === 'sha512' || k === 'md5' || k === 'Glance image' || k === 'Location') dd.className = 'mono';
    dl.append(dt, dd);
  }
  li.append(dl);

  if (job.error) {
    const err = document.createElement('div');
    err.className = 'error';
    err.setAttribute('role', 'alert');
    err.append(describeProblem(job.error.code, job.error.message));
    li.append(err);
  }

  const actions = document.createElement('div');
  actions.className = 'job-actions';
  // A job whose publishing into Glance failed still has its converted image here (the service serves it).
  const downloadable = job.state === 'succeeded' || (job.state === 'failed' && job.error && String(job.error.code).startsWith('GLANCE_'));
  if (downloadable && job.output && job.output.href && job.output.target !== 'rbd') {
    const a = document.createElement('a');
    a.textContent = `Download ${jobName(job).split('/').pop()}.raw`;
    a.href = `/v1/jobs/${job.id}/output`;
    a.setAttribute('download', '');
    actions.append(a);
    if (state.service && state.service.auth) {
      // A signed, short-lived link: the token never goes into a URL.
      a.removeAttribute('href');
      a.setAttribute('aria-disabled', 'true');
      linkFor(job)
        .then((href) => {
          a.href = href;
          a.removeAttribute('aria-disabled');
        })
        .catch(() => (a.textContent = 'Download link unavailable'));
    }
  }
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'secondary';
  if (!isFinal(job.state)) {
    button.textContent = 'Cancel';
    button.setAttribute('aria-label', `Cancel ${jobName(job)}`);
  } else {
    button.textContent = 'Remove';
    button.setAttribute('aria-label', `Remove ${jobName(job)}`);
  }
  button.addEventListener('click', () => cancelOrRemove(job));
  actions.append(button);
  li.append(actions);
  return li;
}

async function cancelOrRemove(job) {
  let res;
  try {
    res = await api(`/v1/jobs/${job.id}`, { method: 'DELETE' });
  } catch {
    return;
  }
  if (res.status === 204) {
    state.jobs.delete(job.id);
    state.streams.get(job.id)?.abort();
    setStatus(`Removed ${jobName(job)}.`);
  } else if (res.ok) {
    const updated = await res.json();
    state.jobs.set(job.id, updated);
    setStatus(`Cancelled ${jobName(job)}.`);
  } else {
    showFormError(await problemOf(res));
  }
  render();
}

// Signed links expire: renew them while the page stays open.
setInterval(() => {
  if (state.service && state.service.auth) for (const job of state.jobs.values()) if (job.state === 'succeeded') render();
}, 5 * 60_000);

start();
