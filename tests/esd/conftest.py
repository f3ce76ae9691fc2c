import contextlib
import io
import logging
import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The test machine is shared by several CPU-heavy jobs; intra-op threads then spin and slow
# everything down several-fold. One thread keeps the suite fast and timings stable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ww():
    """The weightwatcher package, imported quietly (it logs and prints a lot)."""
    warnings.simplefilter("ignore")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import weightwatcher
    for name in ("weightwatcher", "RMT_Util"):  # its loggers only; the root logger is left alone
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return weightwatcher


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
