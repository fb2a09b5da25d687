// Alias so that `node tests/browser/chat.mjs` works too; the check lives in chat.spec.mjs.
import './chat.spec.mjs';
