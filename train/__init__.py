"""Training runtime (installed as ``fusedvlm.train``): stage 1 (contrastive alignment) and
stage 2/3 (answer generation) on LLaVA-style data, single process or torchrun DDP.

Modules: :mod:`.data` (records, datasets, packing collator, resumable sampler),
:mod:`.losses` (InfoNCE, orthogonality, answer cross-entropy), :mod:`.objectives` (the two
stages' trainable wrappers), :mod:`.loop` (optimiser, schedule, checkpoints, metrics),
:mod:`.checkpoint`, :mod:`.distributed`, :mod:`.synthetic` (a shapes VQA set), :mod:`.cli`.
Heavy imports live in the submodules, so importing the package is cheap.
"""

if __name__ != "fusedvlm.train":  # found as a bare `train` from a checkout root
    from fusedvlm._checkout import defer_to_installed

    defer_to_installed(__name__, __file__)
