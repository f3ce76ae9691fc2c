import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Small batched ops run fastest on one thread when the 2 cores are shared (no OpenMP spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def reference_batches():
    """``batches(seed, n, train_fraction, epochs, steps, B)``: the sample indices of every optimizer step of
    one model, as the batched trainer draws them (its subset: the ``round(train_fraction * n)`` positions
    with the smallest hash keys; then reshuffled passes), for single-model reference loops."""
    from wsnets.zoo import trainer as T

    def batches(seed: int, n: int, train_fraction: float, epochs: int, steps: int, B: int):
        seeds = torch.tensor([seed])
        n_sub = max(1, round(train_fraction * n))
        keys = T.hash_uniform(seeds, T._STREAM["subset"], torch.arange(n))[0]
        member = torch.zeros(n, dtype=torch.bool)
        member[keys.argsort()[:n_sub]] = True
        for e in range(epochs):
            order = T._epoch_order(seeds, T._members(member[None]), torch.tensor([n_sub]), e, steps * B, n)[0]
            assert bool(member[order].all())
            for s in range(steps):
                yield order[s * B:(s + 1) * B]
    return batches
