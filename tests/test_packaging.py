"""What the installed distribution promises: the example packs ship with it, and its metadata is complete.

The slow checks live in make targets that CI runs: ``make check-wheel`` installs the built wheel into a fresh
virtualenv and runs ``flyte-gevent demo`` there; ``make test-all`` runs these tests from the unpacked sdist on
every supported Python. These tests read what is installed, so they hold for an editable install and a wheel alike.
"""

import filecmp
import importlib
import importlib.metadata
import importlib.resources
import os
import re

from flyte_gevent import PackDef, _demo, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKS = ("shell_pack", "jira_pack", "ticker_pack")


def test_the_example_packs_are_installed_as_flyte_gevent_examples_and_are_the_checkouts_files():
    directory = _demo._find_examples(None)

    for name in PACKS:
        installed = os.path.join(directory, f"{name}.py")
        assert filecmp.cmp(installed, os.path.join(ROOT, "examples", f"{name}.py"), shallow=False), installed
    jira = importlib.import_module("flyte_gevent.examples.jira_pack")
    assert isinstance(jira.pack_def, PackDef) and jira.pack_def.name == "JiraPack"


def test_demo_with_an_examples_dir_lacking_the_packs_is_a_config_error_naming_the_option(tmp_path, capsys):
    (tmp_path / "jira_pack.py").write_text("")

    assert cli.main(["demo", "--examples", str(tmp_path)]) == cli.EX_CONFIG

    error = capsys.readouterr().err
    assert error.startswith(f"Error: --examples {str(tmp_path)!r}: no shell_pack.py, ticker_pack.py there")
    assert error.count("\n") == 1


def test_metadata_names_the_license_file_the_project_urls_and_the_authors():
    distribution = importlib.metadata.distribution("flyte-gevent")
    metadata = distribution.metadata

    assert metadata["License"] == "Apache-2.0"
    license_files = [file for file in distribution.files or () if file.name == "LICENSE"]
    assert license_files and "Apache License" in license_files[0].read_text()
    assert metadata["Author"] == metadata["Maintainer"] == "flyte_gevent maintainers"
    urls = dict(entry.split(", ", 1) for entry in metadata.get_all("Project-URL"))
    home = "https://github.com/flyte-gevent/flyte-gevent"
    assert urls == {"Source": home, "Issues": f"{home}/issues", "Documentation": f"{home}#readme"}


def test_the_supported_versions_agree_in_the_classifiers_python_requires_makefile_and_readme():
    metadata = importlib.metadata.metadata("flyte-gevent")
    classified = [c.rsplit(" :: ", 1)[1] for c in metadata.get_all("Classifier")
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    with open(os.path.join(ROOT, "Makefile")) as f:
        tested = re.search(r"^SUPPORTED_PYTHONS := (.+)$", f.read(), re.MULTILINE).group(1).split()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()

    assert classified == tested == ["3.11", "3.12", "3.13"]
    assert metadata["Requires-Python"] == f">={tested[0]}"
    assert "**Supported versions:** CPython 3.11, 3.12 and 3.13" in readme


def test_the_package_says_it_is_typed():
    """PEP 561: the installed package holds py.typed, so type checkers read its annotations; the classifier says so."""
    assert importlib.resources.files("flyte_gevent").joinpath("py.typed").is_file()
    assert "Typing :: Typed" in importlib.metadata.metadata("flyte-gevent").get_all("Classifier")
