// Internationalised domain names for people: A-labels (xn--...) decoded to U-labels with the
// Punycode algorithm of RFC 3492 §6.2. Only decoding: the API stores and accepts names in either
// form, and the portal sends what the API returned.

const BASE = 36;
const T_MIN = 1;
const T_MAX = 26;
const SKEW = 38;
const DAMP = 700;
const INITIAL_BIAS = 72;
const INITIAL_N = 0x80;
const MAX_INT = 0x7fffffff;
const ACE_PREFIX = 'xn--';

/** RFC 3492 §6.1: the bias adaptation function. */
function adapt(delta, numPoints, firstTime) {
  let d = firstTime ? Math.floor(delta / DAMP) : Math.floor(delta / 2);
  d += Math.floor(d / numPoints);
  let k = 0;
  while (d > Math.floor(((BASE - T_MIN) * T_MAX) / 2)) {
    d = Math.floor(d / (BASE - T_MIN));
    k += BASE;
  }
  return k + Math.floor(((BASE - T_MIN + 1) * d) / (d + SKEW));
}

/** The value of one basic code point as a digit (0..35), or BASE when it is none. */
function digitOf(code) {
  if (code >= 0x30 && code <= 0x39) return code - 0x30 + 26; // 0-9 are 26..35
  if (code >= 0x41 && code <= 0x5a) return code - 0x41; // A-Z
  if (code >= 0x61 && code <= 0x7a) return code - 0x61; // a-z
  return BASE;
}

/** Decode one Punycode string (without the xn-- prefix); throws RangeError when invalid. */
export function decodePunycode(input) {
  const output = [];
  const basic = Math.max(input.lastIndexOf('-'), 0);
  for (let j = 0; j < basic; j += 1) {
    const code = input.charCodeAt(j);
    if (code >= 0x80) throw new RangeError('not a basic code point');
    output.push(code);
  }
  let n = INITIAL_N;
  let bias = INITIAL_BIAS;
  let i = 0;
  for (let index = basic > 0 ? basic + 1 : 0; index < input.length;) {
    const oldI = i;
    for (let w = 1, k = BASE; ; k += BASE) {
      if (index >= input.length) throw new RangeError('truncated input');
      const digit = digitOf(input.charCodeAt(index));
      index += 1;
      if (digit >= BASE) throw new RangeError('not a digit');
      if (digit > Math.floor((MAX_INT - i) / w)) throw new RangeError('overflow');
      i += digit * w;
      let t = k - bias;
      if (k <= bias) t = T_MIN;
      else if (k >= bias + T_MAX) t = T_MAX;
      if (digit < t) break;
      if (w > Math.floor(MAX_INT / (BASE - t))) throw new RangeError('overflow');
      w *= BASE - t;
    }
    const length = output.length + 1;
    bias = adapt(i - oldI, length, oldI === 0);
    if (Math.floor(i / length) > MAX_INT - n) throw new RangeError('overflow');
    n += Math.floor(i / length);
    i %= length;
    if (n > 0x10ffff || (n >= 0xd800 && n <= 0xdfff)) throw new RangeError('not a code point');
    output.splice(i, 0, n);
    i += 1;
  }
  return String.fromCodePoint(...output);
}

// Characters a name must not show: controls, and bidi/invisible formatting that could make one
// name look like another. A label holding any of them is shown as its A-label.
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]/u;

/** One label for display: an A-label decoded when it decodes to something printable. */
function labelToUnicode(label) {
  if (!label.toLowerCase().startsWith(ACE_PREFIX)) return label;
  try {
    const decoded = decodePunycode(label.slice(ACE_PREFIX.length));
    if (!decoded || UNSAFE.test(decoded) || decoded.includes('.')) return label;
    return decoded.normalize('NFC');
  } catch {
    return label;
  }
}

/** A domain name as people write it (U-labels); unchanged when nothing decodes. */
export function toUnicode(name) {
  const text = String(name ?? '');
  if (!text.toLowerCase().includes(ACE_PREFIX)) return text;
  return text.split('.').map(labelToUnicode).join('.');
}

/** An address (local@domain, or @domain for a catch-all) with its domain as U-labels. */
export function addressToUnicode(address) {
  const text = String(address ?? '');
  const at = text.lastIndexOf('@');
  return at < 0 ? text : text.slice(0, at + 1) + toUnicode(text.slice(at + 1));
}

/** What a filter compares with: lowercase, NFC, so "Bücher" finds xn--bcher-kva.example. */
export function searchText(text) {
  return String(text ?? '').normalize('NFC').toLowerCase().trim();
}
