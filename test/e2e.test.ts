import { runEndToEndSuite } from './support/e2e-suite.js';

runEndToEndSuite('SQLite');
