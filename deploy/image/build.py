"""``make image``: build ``localhost/offload-server:<version>`` from Dockerfile.server with buildah.

No Docker daemon: ``buildah bud --isolation chroot --storage-driver vfs`` (as root). The base is
``--base`` (Dockerfile.server's ``ARG BASE`` by default) when it is in buildah's storage or can be
pulled; where
it cannot, a stand-in is built from Debian's own packages (``stand-in`` below, docs/deployment.md
says how it differs). pip inside the build uses this machine's pip settings: they are passed as a
build secret (never in a layer), and the local directories and files they name (a ``file://``
index, find-links, a CA bundle) are mounted read-only for the RUN steps only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILDAH = ["buildah", "--storage-driver", "vfs"]
DOCKERFILE = ROOT / "Dockerfile.server"
# What the stand-in adds to Debian's minimal base: the interpreter and venv module, and what
# python:3.11-slim also carries for a network server (CA roots, /etc/services, time zones).
STAND_IN_PACKAGES = ("python3", "python3-venv", "ca-certificates", "netbase", "tzdata")
DEFAULT_CACHE = Path("/var/cache/offload-image")
# The label that records what an image was built from: the same inputs, no build (buildah's
# layer cache is off: with vfs it costs more than it saves).
INPUTS_LABEL = "org.offload.build-inputs"


def version() -> str:
    """offload.__version__, read from the file as pyproject.toml does (no import)."""
    text = (ROOT / "offload" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if match is None:
        raise SystemExit("error: no __version__ in offload/__init__.py")
    return match.group(1)


def default_base() -> str:
    """Dockerfile.server's own default: ``ARG BASE=...`` before its first FROM."""
    match = re.search(r"^ARG BASE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit("error: Dockerfile.server has no ARG BASE=... line")
    return match.group(1)


def debian_release() -> str:
    """This machine's Debian codename (/etc/os-release): the stand-in is the same release."""
    fields = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    codename = fields.get("VERSION_CODENAME", "").strip('"')
    if fields.get("ID", "").strip('"') != "debian" or not codename:
        raise SystemExit(
            "error: the stand-in base is built from Debian; this machine is not Debian"
        )
    return codename


def debian_mirror() -> str:
    """The Debian archive apt uses here (deb822 or one-line sources), else deb.debian.org."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for source in sources:
        text = source.read_text() if source.is_file() else ""
        for uri in re.findall(r"(?:^URIs:|^deb)\s+(\S+)", text, re.MULTILINE):
            if uri.rstrip("/").endswith("/debian"):
                return str(uri)
    return "http://deb.debian.org/debian"


def dockerignore_patterns() -> list[re.Pattern[str]]:
    """.dockerignore as regular expressions (Docker's syntax: *, ?, **; no ! exceptions used)."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("!"):
            raise SystemExit("error: .dockerignore: exceptions (!) are not handled here")
        regex = re.escape(line.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        patterns.append(re.compile(regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")))
    return patterns


def ignored(relative: Path, patterns: list[re.Pattern[str]]) -> bool:
    """Docker excludes a path when a pattern matches it or any directory above it."""
    parts = relative.parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.fullmatch(prefix) for p in patterns for prefix in prefixes)


def build_inputs(base_id: str, build_args: list[str]) -> str:
    """A digest of all that the build reads: the base image, the arguments, the build context
    (every file .dockerignore leaves in, Dockerfile.server included)."""
    patterns = dockerignore_patterns()
    digest = hashlib.sha256(json.dumps([base_id, build_args]).encode())
    for directory, subdirectories, files in os.walk(ROOT):
        here = Path(directory).relative_to(ROOT)
        subdirectories[:] = sorted(d for d in subdirectories if not ignored(here / d, patterns))
        for name in sorted(f for f in files if not ignored(here / f, patterns)):
            digest.update(f"{here / name}\0".encode() + (ROOT / here / name).read_bytes())
    return digest.hexdigest()


def labels(name: str) -> dict[str, str] | None:
    """The image's labels, None if there is no such image."""
    inspected = subprocess.run(
        [*BUILDAH, "inspect", "--type", "image", name], capture_output=True, text=True, check=False
    )
    if inspected.returncode != 0:
        return None
    return dict(json.loads(inspected.stdout)["OCIv1"]["config"].get("Labels") or {})


def run(
    command: list[str], *, capture: bool = False, quiet: bool = False, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``command``, shown first; ``capture``: its stdout is returned, ``quiet``: dropped."""
    print("+", shlex.join(command), flush=True)
    stdout = subprocess.PIPE if capture else subprocess.DEVNULL if quiet else None
    return subprocess.run(command, check=True, text=True, stdout=stdout, cwd=cwd)


def image_present(name: str) -> bool:
    return labels(name) is not None


def image_id(name: str) -> str:
    return run(
        [*BUILDAH, "inspect", "--type", "image", "--format", "{{.FromImageID}}", name], capture=True
    ).stdout.strip()


def pullable(name: str) -> bool:
    if image_present(name):
        return True
    pulled = subprocess.run(
        [*BUILDAH, "pull", "--quiet", name], capture_output=True, text=True, check=False
    )
    if pulled.returncode != 0:
        reason = (pulled.stderr.strip().splitlines() or ["no reason given"])[-1]
        print(f"cannot pull {name} ({reason})", flush=True)
    return pulled.returncode == 0


def stand_in(cache: Path) -> str:
    """``localhost/offload-base:debian-<release>``: debootstrap --variant=minbase of this
    machine's Debian release with its Python, committed as an image. The root filesystem's
    tarball is cached, so that a lost image is rebuilt in seconds, without the archive."""
    release = debian_release()
    name = f"localhost/offload-base:debian-{release}"
    if image_present(name):
        return name
    tarball = cache / f"debian-{release}-minbase-python3.tar"
    if not tarball.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as work:
            rootfs = Path(work) / "rootfs"
            run(
                [
                    *("debootstrap", "--variant=minbase"),
                    f"--include={','.join(STAND_IN_PACKAGES)}",
                    *(release, str(rootfs), debian_mirror()),
                ],
                quiet=True,
            )
            # What an image needs no copy of: apt's lists and downloaded packages.
            run(["chroot", str(rootfs), "apt-get", "clean"])
            for lists in (rootfs / "var/lib/apt/lists").glob("*_*"):
                lists.unlink()
            partial = tarball.with_suffix(".partial")
            run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."])
            partial.rename(tarball)
    container = run([*BUILDAH, "from", "scratch"], capture=True).stdout.strip()
    try:
        run([*BUILDAH, "add", container, str(tarball), "/"])
        run(
            [
                *(*BUILDAH, "config"),
                *("--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
                *("--env", "LANG=C.UTF-8", "--cmd", "python3"),
                *("--label", f"org.opencontainers.image.description=Debian {release} minbase"),
                container,
            ]
        )
        run([*BUILDAH, "commit", "--quiet", "--rm", container, name])
    except BaseException:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True, check=False)
        raise
    return name


def pip_settings(listing: str) -> tuple[str, list[Path]]:
    """``pip config list`` (files and PIP_* variables, merged) as one pip.conf, and the local
    paths its values name. The environment's values win over the files', as in pip."""
    sections: dict[str, dict[str, str]] = {}
    from_env: dict[str, str] = {}
    for line in listing.splitlines():
        match = re.fullmatch(r"(:env:|[\w-]+)\.([\w-]+)='(.*)'", line.strip())
        if match is None:
            continue
        section, key, value = match.groups()
        if key == "config-file":
            continue
        if section == ":env:":
            from_env[key] = value
        else:
            sections.setdefault(section, {})[key] = value
    sections.setdefault("global", {}).update(from_env)
    text = "".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())
        for section, values in sections.items()
        if values
    )
    paths = []
    for values in sections.values():
        for value in values.values():
            for word in value.split():
                path = Path(word.removeprefix("file://"))
                if (word.startswith("file://") or word.startswith("/")) and path.exists():
                    # A local index's pages link to files beside it (../files/...).
                    paths.append(path.parent if path.name == "simple" else path)
    return text, sorted(set(paths))


def main() -> None:
    parser = argparse.ArgumentParser(prog="make image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=default_base(), help="the base image (%(default)s)")
    parser.add_argument(
        "--tag",
        default=f"localhost/offload-server:{version()}",
        help="the image to build (%(default)s)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("IMAGE_CACHE", DEFAULT_CACHE)),
        help="where the stand-in's root filesystem tarball is kept (%(default)s)",
    )
    args = parser.parse_args()
    started = time.monotonic()
    base = args.base
    if not pullable(base):
        base = stand_in(args.cache)
        print(f"base: {base}, a stand-in for {args.base} (docs/deployment.md)", flush=True)
    build_args = [f"BASE={base}"]
    inputs = build_inputs(image_id(base), build_args)
    if (labels(args.tag) or {}).get(INPUTS_LABEL) == inputs:
        print(f"{args.tag} is up to date (built from these very inputs)", flush=True)
        return
    listing = run([sys.executable, "-m", "pip", "config", "list"], capture=True).stdout
    pip_conf, local_paths = pip_settings(listing)
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as secret:
        secret.write(pip_conf)
        secret.flush()
        run(
            [
                # No --layers: with vfs every cached step is a full copy of the file system
                # (a build took 6 to 10 minutes with them, about 1.5 without).
                *(*BUILDAH, "bud", "--isolation", "chroot"),
                # Docker's format: the OCI one has no HEALTHCHECK (buildah would drop it).
                *("--format", "docker"),
                *("-f", "Dockerfile.server", "-t", args.tag),
                *[f"--build-arg={arg}" for arg in build_args],
                *("--label", f"org.opencontainers.image.base.name={base}"),
                *("--label", f"org.opencontainers.image.version={version()}"),
                *("--label", f"{INPUTS_LABEL}={inputs}"),
                f"--secret=id=pip.conf,src={secret.name}",
                *[f"--volume={path}:{path}:ro" for path in local_paths],
                ".",
            ],
            cwd=ROOT,
        )
    # The image this tag named before is untagged now: it goes (no disk filled build by build).
    subprocess.run([*BUILDAH, "rmi", "--prune"], capture_output=True, check=False)
    print(f"built {args.tag} in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as failed:
        command = shlex.join(str(word) for word in failed.cmd)
        message = f"error: {command[:200]} exited {failed.returncode} (its output is above)"
        raise SystemExit(message) from None
