"""Pure-torch reference implementations: clear over fast, the ground truth for tests and the
baselines of benchmarks. Production code never imports from here."""
