import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { InvalidTopicError, parseTopic, TopicCatalog } from '../core/topics.js';

/** Loads every `*.json` SubscriptionTopic from a directory; a bad file stops start-up with its name. */
export function loadTopicCatalog(dir: string): TopicCatalog {
  const files = readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .sort();
  return new TopicCatalog(
    files.map((file) => {
      const path = join(dir, file);
      let json: unknown;
      try {
        json = JSON.parse(readFileSync(path, 'utf8'));
      } catch (err) {
        throw new InvalidTopicError(path, `not JSON: ${(err as Error).message}`);
      }
      return parseTopic(json, path);
    }),
  );
}
