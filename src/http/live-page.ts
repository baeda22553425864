import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';

/**
 * `GET /live`: one self-contained page, read once at start. Its inline script and style are
 * allowed by hash in a strict Content-Security-Policy, so nothing else can run on the page that
 * holds an API key.
 */

export interface LivePage {
  readonly html: string;
  readonly headers: Readonly<Record<string, string>>;
}

export function loadLivePage(): LivePage {
  const html = readFileSync(new URL('./live/live.html', import.meta.url), 'utf8');
  const hash = (tag: string): string => {
    const m = new RegExp(`<${tag}>([\\s\\S]*?)</${tag}>`).exec(html);
    return `'sha256-${createHash('sha256')
      .update(m?.[1] ?? '')
      .digest('base64')}'`;
  };
  return {
    html,
    headers: {
      'content-type': 'text/html; charset=utf-8',
      'content-security-policy': `default-src 'none'; script-src ${hash('script')}; style-src ${hash('style')}; connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'`,
      'x-content-type-options': 'nosniff',
      'referrer-policy': 'no-referrer',
      'cache-control': 'no-store',
    },
  };
}
