"""The benchmark suite behind ``fusedvlm bench`` (design §9): the n_l sweep
(:mod:`.sweep`), FLOP counting with attention included (:mod:`.flops`), machine facts
(:mod:`.system`) and the report writers (:mod:`.report`)."""
