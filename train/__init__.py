"""Training runtime (installed as ``fusedvlm.train``): stage 1 (contrastive alignment) and
stage 2/3 (answer generation) on LLaVA-style data, single process or torchrun DDP.

Modules: :mod:`.data` (records, datasets, packing collator, resumable sampler),
:mod:`.losses` (InfoNCE, orthogonality, answer cross-entropy), :mod:`.objectives` (the two
stages' trainable wrappers), :mod:`.loop` (optimiser, schedule, checkpoints, metrics),
:mod:`.checkpoint`, :mod:`.distributed`, :mod:`.synthetic` (a shapes VQA set), :mod:`.cli`.
Heavy imports live in the submodules, so importing the package is cheap.
"""
