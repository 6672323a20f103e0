"""The version matrix and the lock (docs/compatibility.md).

    nox -s matrix    # when a new transformers, TRL or PEFT is out: the matrix, then the tested range and the lock
    nox -s lock      # only re-resolve requirements/lock.txt within pyproject's bounds

`matrix` runs one session per transformers release (the newest patch of each minor release on the registry, from
`FLOOR`), each with the newest TRL, PEFT and accelerate the resolver allows beside it, and records per suite what
passed, failed or was skipped (and why). Then `compatibility` writes docs/compatibility.md and the tested range —
the floor and the newest release before the first one that failed — into the bundle's configuration
(`TESTED_TRANSFORMERS`) and pyproject's transformers bounds (below the next minor release), and `lock` re-resolves
the lock within them (the newest tested transformers, the newest TRL/PEFT/accelerate). The whole test suite on the
locked versions is `bash scripts/test.sh` (what CI runs): run it after the lock moves.

Needs `nox` and `uv` (`python3 -m pip install nox uv`); torch comes from pip's find-links folders when pip has some
configured (a local CPU build), otherwise from the registry.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = []  # nothing by default: name the sessions to run

REPO = Path(__file__).resolve().parent
LOCK = REPO / "requirements" / "lock.txt"
RESULTS = REPO / ".nox" / "compatibility"
DOC = REPO / "docs" / "compatibility.md"
BUNDLE_CONFIG = REPO / "configuration" / "configuration_asymoe.py"
TORCH = (REPO / "requirements" / "torch.txt").read_text().split("\n", 1)[1].strip()  # torch==<version>+cpu
FLOOR = (5, 17)
# What each transformers release must pass: the model and its Hub bundle, generation, upcycling parity, TRL and PEFT.
SUITES = {
    "model": ["tests/test_modeling.py", "tests/test_experts.py", "tests/test_hyperbolic.py", "tests/test_routing.py"],
    "generation": ["tests/test_generation.py"],
    "hub bundle": ["tests/test_hub_bundle.py"],
    "upcycling": ["tests/test_upcycling.py", "tests/test_upcycling_anyres.py"],
    "trl": ["tests/test_sft.py", "tests/test_dpo.py", "tests/test_stock_trl.py"],
    "peft": ["tests/test_lora.py"],
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _find_links() -> list[str]:
    """`--find-links` arguments for uv from pip's configuration (uv does not read pip's)."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    folders = [value for key, value in re.findall(r"^(\S+find-links)='([^']*)'", listing, flags=re.MULTILINE)]
    return [arg for folder in dict.fromkeys(" ".join(folders).split()) for arg in ("--find-links", folder)]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def transformers_releases() -> list[str]:
    """The newest patch of every transformers minor release from `FLOOR` on, as the registry lists them."""
    listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"],
                             capture_output=True, text=True)
    found = re.search(r"Available versions: (.*)", listing.stdout)
    if found is None:
        raise RuntimeError(f"could not list transformers releases (pip index versions): {listing.stderr.strip()}")
    newest: dict[tuple[int, int], str] = {}
    for version in found.group(1).split(", "):
        if not re.fullmatch(r"\d+\.\d+\.\d+", version):
            continue  # pre-releases
        minor = _version_key(version)[:2]
        if minor >= FLOOR and (minor not in newest or _version_key(version) > _version_key(newest[minor])):
            newest[minor] = version
    return [newest[minor] for minor in sorted(newest)]


@nox.session(python=False)
def lock(session: nox.Session) -> None:
    """Re-resolve the lock from pyproject's `test` extra, with the CPU torch of requirements/torch.txt (Linux,
    CPython 3.11: the machines the README's commands and CI run on)."""
    LOCK.parent.mkdir(exist_ok=True)
    session.run(
        "uv", "pip", "compile", "pyproject.toml", "--extra", "test", "--python-version", "3.11", "--upgrade",
        "--constraint", "requirements/torch.txt", *_find_links(), "--custom-compile-command", "nox -s lock",
        "--output-file", str(LOCK.relative_to(REPO)), "--quiet",
    )
    session.log(f"wrote {LOCK.relative_to(REPO)}: " + ", ".join(
        line for line in LOCK.read_text().splitlines() if re.match(r"(transformers|trl|peft|accelerate)==", line)))


@nox.session(python="3.11")
@nox.parametrize("transformers", transformers_releases())
def matrix(session: nox.Session, transformers: str) -> None:
    """The focused suites against one transformers release (newest TRL/PEFT/accelerate that install beside it)."""
    session.install(TORCH, *_find_links())
    pin = Path(session.create_tmp()) / "transformers.txt"
    pin.write_text(f"transformers=={transformers}\n")  # an override: below 5.18 too, where the toolkit's pin stops
    session.install("-e", ".[test]", TORCH, "--override", str(pin), *_find_links())
    versions = json.loads(session.run(
        "python", "-c", "import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
        "('transformers', 'trl', 'peft', 'accelerate', 'torch')}))", silent=True).strip().splitlines()[-1])
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = RESULTS / f"{transformers}.xml"
    files = [path for paths in SUITES.values() for path in paths]
    session.run("python", "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files,
                *session.posargs, env=OFFLINE, success_codes=[0, 1])
    (RESULTS / f"{transformers}.json").write_text(json.dumps({"versions": versions, "suites": _tally(report)}))
    session.notify("compatibility")


def _tally(report: Path) -> dict[str, dict]:
    """Per suite: passed / failed / skipped counts, and the reasons of skips and failures, from a JUnit report."""
    suite_of = {Path(path).stem: suite for suite, paths in SUITES.items() for path in paths}
    tally = {suite: {"passed": 0, "failed": 0, "skipped": 0, "reasons": []} for suite in SUITES}
    for case in ElementTree.parse(report).iter("testcase"):
        suite = suite_of.get(case.get("classname", "").split(".")[-1])
        if suite is None:
            continue
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        entry = tally[suite]
        if outcome is None:
            entry["passed"] += 1
            continue
        kind = "skipped" if outcome.tag == "skipped" else "failed"
        entry[kind] += 1
        reason = (outcome.get("message") or "").splitlines()[0][:160] if outcome.get("message") else outcome.tag
        entry["reasons"].append(f"{case.get('name')}: {reason}")
    return tally


@nox.session(python=False)
def compatibility(session: nox.Session) -> None:
    """Write docs/compatibility.md and the bundle's tested range from the matrix results."""
    releases = transformers_releases()
    rows = {path.stem: json.loads(path.read_text()) for path in RESULTS.glob("*.json")}
    if missing := [release for release in releases if release not in rows]:
        session.error(f"no matrix results for transformers {missing}: run the whole matrix (`nox -s matrix`)")
    passing = []
    for release in releases:  # the tested range ends before the first release with a failure
        if any(entry["failed"] for entry in rows[release]["suites"].values()):
            break
        passing.append(release)
    if not passing or passing[0] != releases[0]:
        session.error(f"the floor {releases[0]} fails: fix it, or raise the floor (FLOOR in noxfile.py and pyproject)")
    tested = {"minimum": passing[0], "newest": passing[-1]}
    BUNDLE_CONFIG.write_text(re.sub(
        r"^TESTED_TRANSFORMERS = .*$", f"TESTED_TRANSFORMERS = {json.dumps(tested)}", BUNDLE_CONFIG.read_text(),
        count=1, flags=re.MULTILINE))
    newest = _version_key(tested["newest"])
    pyproject = REPO / "pyproject.toml"
    pyproject.write_text(re.sub(r'"transformers>=([\d.]+),<[\d.]+"', rf'"transformers>=\1,<{newest[0]}.{newest[1] + 1}"',
                                pyproject.read_text()))
    DOC.write_text(_table(rows, releases, tested))
    session.log(f"tested range {tested['minimum']} to {tested['newest']}; wrote {DOC.relative_to(REPO)}")
    session.notify("lock")


def _table(rows: dict, releases: list[str], tested: dict) -> str:
    lines = [
        "# Compatibility: the version matrix",
        "",
        "Written by `nox -s matrix` (noxfile.py) — do not edit by hand. Each row: one transformers release (the newest",
        "patch of its minor release), with the newest TRL, PEFT and accelerate that install beside it, CPU torch;",
        "each cell: the suite's tests passed / failed / skipped. The whole suite runs on the locked versions",
        "(requirements/lock.txt) in CI.",
        "",
        f"**Tested range: transformers {tested['minimum']} to {tested['newest']}** — recorded in every checkpoint's",
        "`config.json` (`tested_transformers`); its code refuses an older release and warns under a newer one.",
        "",
        "| transformers | trl | peft | accelerate | " + " | ".join(SUITES) + " |",
        "|---|---|---|---|" + "---|" * len(SUITES),
    ]
    notes = []
    for release in releases:
        versions, suites = rows[release]["versions"], rows[release]["suites"]
        cells = []
        for suite in SUITES:
            entry = suites[suite]
            cells.append(f"{entry['passed']} / {entry['failed']} / {entry['skipped']}")
            notes += [f"- {release}, {suite}: {reason}" for reason in entry["reasons"]]
        lines.append(f"| {release} | {versions['trl']} | {versions['peft']} | {versions['accelerate']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Skips and failures:", "", *(notes or ["- none"]), ""]
    return "\n".join(lines)
