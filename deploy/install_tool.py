#!/usr/bin/env python3
"""install_tool.py - the parts of deploy/install.sh and uninstall.sh that want a parser (stdlib only).

    install_tool.py sudoers USER EXPERIMENTS_DIR NGINX_HELPER PHP_HELPER
        Print /etc/sudoers.d/smart-server: for USER, each exact argument vector that the
        experiments in EXPERIMENTS_DIR make smart.py run through a helper, plus `test` of each
        helper.  An experiment's meta.json may carry "helper": "smart-nginx" (or "smart-php") and
        variants with "set": {"NAME": "VALUE", ...}; smart.py then runs
            apply   HELPER set N1 V1 N2 V2 ...   (names sorted) for each variant with a set
            revert  HELPER reset N1 N2 ...       (the sorted union of the experiment's names)
            dry run HELPER get N1 N2 ...         (the same names)
        A "sweep" stands for its variants, expanded and validated by smart.py (beside deploy/).
        Each vector is checked by the helper itself (`python3 -I deploy/smart-X check VECTOR`, which
        validates the arguments and reads nothing): a value outside a name's grammar
        is refused here (exit 1), so the drop-in never lists a vector the helper would refuse.
        Only experiments whose folder and meta.json belong to this user (root) and are writable by
        it alone are read; another's is skipped with a warning.
    install_tool.py access-log add|remove NGINX_CONF SNIPPET
        add: make nginx.conf's http-level access_log lines conditional (` if=$smart_visitor`, the
        variable SNIPPET defines; Debian's `access_log PATH;` gets its format named too:
        `PATH combined if=$smart_visitor`), when nginx.conf's http block includes SNIPPET; remove:
        take that back off (` combined if=$smart_visitor` too: an `access_log PATH combined;` of
        your own comes back as `access_log PATH;`, the same thing).  Prints what it did; exit 3 when nginx.conf does not include SNIPPET (nothing done).
    install_tool.py access-log dir NGINX_CONF
        The folder of nginx.conf's http-level access_log (where smart-timing.log goes), if any.
"""

import fnmatch
import importlib.machinery
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
import tempfile

sys.dont_write_bytecode = True          # loading the helpers for their tokenizer leaves no .pyc in deploy/

HERE = os.path.dirname(os.path.abspath(__file__))
HELPERS = ("smart-nginx", "smart-php")
CONDITION = b"if=$smart_visitor"


def load_helper(source, name):
    """The helper file as a module: its tables and argument parser (its main() is not run)."""
    path = os.path.join(source, name)
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def trusted(path):
    info = os.lstat(path)
    return (not stat.S_ISLNK(info.st_mode) and info.st_uid == os.geteuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def sudoers_word(word):
    """One argument as sudoers reads it: backslash before its special characters."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", word):
        raise SystemExit(f"install_tool.py: {word!r} cannot be listed in sudoers")
    return re.sub(r"([\\,:=])", r"\\\1", word)


def experiment_vectors(folder):
    """[(helper, argv, why)] that the experiment in folder declares; SystemExit on a bad one."""
    meta_path = os.path.join(folder, "meta.json")
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    helper = meta.get("helper") if isinstance(meta, dict) else None
    variants = [v for v in (meta.get("variants") or []) if isinstance(v, dict)] if isinstance(meta, dict) else []
    if isinstance(meta, dict) and "sweep" in meta:
        variants = sweep_variants(meta_path, meta)
    with_set = [v for v in variants if "set" in v]
    if helper is None:
        if with_set:
            raise SystemExit(f"install_tool.py: {meta_path}: variants have \"set\" but there is no \"helper\"")
        return []
    if helper not in HELPERS:
        raise SystemExit(f"install_tool.py: {meta_path}: helper {helper!r}: expected one of {', '.join(HELPERS)}")
    found, names = [], set()
    for variant in with_set:
        where = f"{meta_path}: variant {variant.get('name')!r}"
        pairs = variant["set"]
        if not isinstance(pairs, dict) or not pairs:
            raise SystemExit(f"install_tool.py: {where}: \"set\" must be an object of NAME: VALUE strings")
        if not all(isinstance(v, str) for v in pairs.values()):
            raise SystemExit(f"install_tool.py: {where}: every value in \"set\" must be a string")
        argv = ["set"]
        for name in sorted(pairs):
            argv += [name, pairs[name]]
        check(helper, argv, where)
        names.update(pairs)
        found.append((helper, argv, f"apply {variant.get('name')}"))
    if names:
        for verb, why in (("reset", "revert"), ("get", "run --dry-run")):
            argv = [verb, *sorted(names)]
            check(helper, argv, meta_path)
            found.append((helper, argv, why))
    return found


def sweep_variants(meta_path, meta):
    """The variants a sweep stands for, as smart.py (beside this folder) expands and validates it."""
    loader = importlib.machinery.SourceFileLoader("smart", os.path.join(os.path.dirname(HERE), "smart.py"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    smart = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = smart      # dataclasses look their module up there while smart.py loads
    loader.exec_module(smart)
    try:
        return smart.load_experiment(os.path.dirname(meta_path)).variants
    except smart.SmartError as exc:
        raise SystemExit(f"install_tool.py: {exc}")


def check(helper, argv, where):
    """The helper's own verdict on argv: `HELPER check ...` exits 0, or 2 with its reason."""
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    done = subprocess.run([python, "-I", os.path.join(HERE, helper), "check", *argv], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[0] if done.stderr.strip() else f"exit {done.returncode}"
        raise SystemExit(f"install_tool.py: {where}: {helper} refuses `{' '.join(argv)}`: {reason}")


def sudoers(user, experiments, paths):
    lines = [
        "# /etc/sudoers.d/smart-server - what the `smart` user (smart.py's service) may run as root.",
        "# Generated by deploy/install.sh from the installed experiments; rewritten by every install.sh run",
        "# (so adding an experiment and running install.sh again lists its vectors).  Do not edit: put rules",
        "# of your own in another file (sudo visudo -f /etc/sudoers.d/smart-local).",
        "#",
        "# Only the root-owned helpers, and only with these exact argument vectors: sudo matches the",
        "# arguments of a rule literally, and no rule here has a wildcard.  Each vector was checked by the",
        "# helper itself (HELPER check ...); the helper reads which files it edits from its own root-owned",
        "# config, never from its caller.  Check the live rules with `sudo -l -U smart`.",
        "",
        "# The service has no terminal; never ask for one.",
        f"Defaults:{user} !requiretty",
        "",
        "# smart.py doctor and the operator",
    ]
    seen = set()

    def rule(helper, argv):
        line = f"{user} ALL=(root) NOPASSWD: {paths[helper]} {' '.join(sudoers_word(w) for w in argv)}"
        if line in seen:
            return None
        seen.add(line)
        return line

    for helper in HELPERS:
        lines.append(rule(helper, ["test"]))
    for name in sorted(os.listdir(experiments)) if os.path.isdir(experiments) else []:
        folder = os.path.join(experiments, name)
        meta = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta):
            continue
        if not (trusted(experiments) and trusted(folder) and trusted(meta)):
            print(f"install_tool.py: warning: skipped {folder}: it and its meta.json must belong to uid "
                  f"{os.geteuid()} and be writable by it alone (chown -R root:root {folder}; chmod -R go-w {folder})",
                  file=sys.stderr)
            continue
        try:
            vectors = experiment_vectors(folder)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"install_tool.py: {meta}: {exc}")
        entries = []
        for helper, argv, why in vectors:
            line = rule(helper, argv)
            if line:
                entries += [f"# {name}: {why}", line]
        if entries:
            lines += [""] + entries
    return "\n".join(lines) + "\n"


# -- nginx.conf's access_log --

def http_of(module, data):
    blocks = [d for d in module.find(module.parse(data), "http") if d.children is not None]
    return blocks[0].children if len(blocks) == 1 else None


def includes(module, conf, http, snippet):
    for directive in module.find(http, "include"):
        for word in directive.words():
            pattern = word.strip("\"'")
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(conf), pattern)
            if fnmatch.fnmatchcase(snippet, pattern):
                return True
    return False


def access_log(action, conf, snippet=None):
    module = load_helper(HERE, "smart-nginx")
    with open(conf, "rb") as handle:
        data = handle.read()
    http = http_of(module, data)
    logs = [d for d in module.find(http or [], "access_log") if d.args]
    if action == "dir":
        paths = [d.words()[0] for d in logs if d.words()[0] not in ("off",) and d.words()[0].startswith("/")]
        if paths:
            print(os.path.dirname(paths[0]))
        return 0
    if http is None or not includes(module, conf, http, snippet):
        print(f"{conf}'s http block does not include {snippet}")
        return 3
    edits = []
    for directive in logs:
        words = directive.args
        if action == "add" and words[0] != b"off" and not any(w.startswith(b"if=") for w in words):
            # the format is positional: `access_log PATH;` (Debian's) becomes PATH combined if=...
            text = (b" " if len(words) > 1 else b" combined ") + CONDITION
            edits.append((directive.args_end, directive.args_end, text))
        elif action == "remove" and words[-1] == CONDITION and len(words) > 1:
            start = data.rindex(CONDITION, 0, directive.args_end)
            while data[start - 1:start] in (b" ", b"\t"):
                start -= 1
            if words[1:] == [b"combined", CONDITION]:        # what add wrote for Debian's one-word line
                start = data.rindex(b"combined", 0, start)
                while data[start - 1:start] in (b" ", b"\t"):
                    start -= 1
            edits.append((start, directive.args_end, b""))
    if not edits:
        print("unchanged")
        return 0
    for start, end, text in sorted(edits, reverse=True):
        data = data[:start] + text + data[end:]
    like = os.stat(conf)
    fd, temp = tempfile.mkstemp(prefix=".smart-install.", dir=os.path.dirname(conf))
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(temp, stat.S_IMODE(like.st_mode))
    if os.geteuid() == 0:
        os.chown(temp, like.st_uid, like.st_gid)
    os.replace(temp, conf)
    print(f"{'made' if action == 'add' else 'took if=$smart_visitor off'} {len(edits)} access_log line(s)"
          f"{' conditional (if=$smart_visitor)' if action == 'add' else ''}")
    return 0


def main(argv):
    if len(argv) == 5 and argv[0] == "sudoers":
        user, experiments, nginx_helper, php_helper = argv[1:5]
        sys.stdout.write(sudoers(user, experiments, {"smart-nginx": nginx_helper, "smart-php": php_helper}))
        return 0
    if len(argv) == 4 and argv[0] == "access-log" and argv[1] in ("add", "remove"):
        return access_log(argv[1], argv[2], argv[3])
    if len(argv) == 3 and argv[0] == "access-log" and argv[1] == "dir":
        return access_log("dir", argv[2])
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
