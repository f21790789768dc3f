"""Pure-torch reference implementations: clear over fast, the ground truth for tests and the
baselines of benchmarks. Production code imports one of them: the packed-attention reference is
also that op's torch path (``FUSEDVLM_BACKEND=torch`` or no C++ build), so that the CPU has one
attention implementation besides the C++ kernel."""
