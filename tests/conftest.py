import pytest

from support import free_port


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def llmisvc_home(tmp_path, monkeypatch):
    """An isolated LLMISVC_HOME and gateway port for tests that drive the local runtime."""
    home = tmp_path / "llmisvc-home"
    home.mkdir()
    monkeypatch.setenv("LLMISVC_HOME", str(home))
    monkeypatch.setenv("LLMISVC_GATEWAY_PORT", str(free_port()))
    return home
