import pytest

from spec_factory import EXAMPLES


@pytest.fixture
def example_text():
    def read(name: str, version: str | None = None) -> str:
        text = (EXAMPLES / name).read_text()
        if version is not None:
            text = text.replace("serving.kserve.io/v1alpha1", f"serving.kserve.io/{version}")
            text = text.replace("serving.kserve.io/v1alpha2", f"serving.kserve.io/{version}")
        return text
    return read
