"""``import dept_fast`` stays light: names load on first use, and the embedding stage alone never
imports transformers (seconds on a loaded machine)."""
import subprocess
import sys

import dept_fast


def test_the_embedding_stage_does_not_import_transformers():
    code = ("import sys, dept_fast\n"
            "assert 'dept_fast.hf' not in sys.modules and 'transformers' not in sys.modules\n"
            "from dept_fast import FusedDePTEmbedding, dept_embedding, budget\n"
            "assert 'transformers' not in sys.modules, 'the embedding stage imported transformers'\n"
            "from dept_fast import apply_dept\n"
            "assert 'dept_fast.hf' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves():
    for name in dept_fast.__all__:
        assert getattr(dept_fast, name) is not None, name
    assert set(dir(dept_fast)) >= set(dept_fast.__all__)
