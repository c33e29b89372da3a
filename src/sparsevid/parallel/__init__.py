"""Attention over several GPUs: ring context parallelism with block plans (:mod:`.ring`) and Ulysses head
balance (:mod:`.head_balance`)."""
