"""Pure-torch reference implementations: clear over fast, the ground truth for tests."""
