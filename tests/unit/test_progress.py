import io

import pytest

from lowbit_deploy.progress import show_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("progress, stream, expected", [
    (None, io.StringIO(), False),  # auto: a pipe or a CI log gets no bar
    (None, _Terminal(), True),     # auto: a terminal does
    (True, io.StringIO(), True),   # --progress forces it
    (False, _Terminal(), False),   # --no-progress hides it
])
def test_show_progress(progress, stream, expected):
    assert show_progress(progress, stream) is expected
