"""Security defaults: where services listen, what reaches MLflow and logs, what a recipe may name as a reward.

Ray's dashboard and job API run arbitrary code for whoever can reach them, and the MLflow UI has no
authentication: both are bound to loopback or a private address, never 0.0.0.0 on a public interface, unless
the operator opts in explicitly (and then with Ray token auth, ``RAY_AUTH_MODE=token``).

- ``check_bind_address(host, what)``: warnings for a wildcard or public bind address (empty list when fine).
- ``redact(params)``: hide values whose key looks like a secret, and passwords inside URLs, before params or
  resolved recipes are logged to MLflow or printed.
- ``check_reward_spec(spec)``: the reward-reference grammar of ``rewards/registry.py``, applied at the recipe level
  (the registry applies it again when resolving, and resolves only functions declared as rewards).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from typing import Any

REDACTED = "***REDACTED***"

# Words (after splitting a key on ., _, -, /, spaces and camelCase) that mark a value as secret. Plural
# "tokens" is deliberately absent: `max_response_tokens` and `micro_batch_tokens` are lengths, not secrets.
_SECRET_WORDS = frozenset({"token", "password", "passwd", "pwd", "secret", "credential", "credentials",
                           "apikey", "passphrase"})
# Adjacent word pairs that mark a secret (`api_key`, `HF_ACCESS_KEY`, `private-key`); written as one word
# (`accesskey`) they count too.
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"),
                           ("auth", "key"), ("client", "secret"), ("session", "key")})
_SECRET_COMPOUNDS = frozenset(a + b for a, b in _SECRET_PAIRS)
# A word ending in one of these is a compound secret name (`apitoken`, `authtoken`, `dbpassword`); `tokens`
# and `tokenizer` do not end in them.
_SECRET_SUFFIXES = ("token", "password", "passwd", "secret", "credential", "credentials", "passphrase", "apikey")
# `key=value` inside a string (query strings, run names, messages): the value is hidden when the key is secret.
_INLINE_ASSIGN = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)(?P<sep>=)(?P<value>[^\s&,;'\"]+)")
# Values that are credentials whatever key they sit under (Hugging Face, OpenAI-style, GitHub, AWS, Slack).
_TOKEN_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|"
                          r"github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9\-]{10,})\b")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<pw>[^/@\s]+)@")
_WILDCARDS = {"0.0.0.0", "::", "[::]", "*", "", "0:0:0:0:0:0:0:0"}


# ---------------------------------------------------------------------------------------------- bind addresses


def check_bind_address(host: str | None, what: str) -> list[str]:
    """Warnings for binding ``what`` (e.g. "Ray dashboard") to ``host``; an empty list means it is fine.

    Warned: wildcards (0.0.0.0, ::, empty), which listen on every interface including public ones, and
    global (public) IP addresses. Loopback, private (RFC 1918 / ULA), link-local and hostnames pass;
    hostnames are not resolved (no DNS lookups here).
    """
    value = (host or "").strip()
    if value.lower() in _WILDCARDS:
        public = _public_interface_addresses()
        on = f" This machine has public addresses {', '.join(public)}." if public else ""
        return [f"{what} binds to {value or '<all interfaces>'}: it listens on every interface, public ones "
                f"included.{on} Bind to 127.0.0.1 (reach it through an SSH tunnel or `ray dashboard`) or to a "
                f"private address, and enable Ray token auth (RAY_AUTH_MODE=token) if it must be reachable."]
    try:
        ip = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return []  # a hostname: not resolved here
    if ip.is_global:
        return [f"{what} binds to the public address {value}: anyone who can reach it can submit jobs or read "
                f"the run. Bind to 127.0.0.1 or a private address (10.x, 172.16-31.x, 192.168.x)."]
    return []


def _public_interface_addresses() -> list[str]:
    """Global IP addresses of this machine's interfaces (empty where psutil is unavailable)."""
    try:
        import psutil
    except ImportError:
        return []
    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            try:
                ip = ipaddress.ip_address(a.address.split("%")[0])
            except ValueError:
                continue
            if ip.is_global:
                found.append(str(ip))
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------- file modes


def make_private_dir(path: str | os.PathLike, mode: str | int = "0700") -> None:
    """Create ``path`` (and missing parents) with ``mode`` (octal string such as "0700"); an existing folder keeps
    the mode its owner gave it. Run folders hold checkpoints, logs and the MLflow store: owner-only by default."""
    bits = int(str(mode)[-3:], 8) if isinstance(mode, str) else int(mode)
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, mode=bits, exist_ok=True)
    for folder in missing:
        os.chmod(folder, bits)  # os.makedirs applies the umask; the recipe's mode wins


def ray_token_path() -> str:
    """Where Ray keeps its token for ``RAY_AUTH_MODE=token`` (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``)."""
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def tighten_ray_token() -> bool:
    """Make this user's Ray token file 0600 (Ray writes it 0644); True when the mode was changed. A file of
    another owner is left alone (its owner's Ray keeps working), as is a missing one."""
    return _owner_only(ray_token_path(), 0o600)


def tighten_ray_session(session_dir: str | os.PathLike) -> bool:
    """Make the session folder of a Ray instance this run started 0700 (Ray creates it 0755 under /tmp/ray:
    worker logs, which hold prompts and tracebacks, and its sockets). True when the mode was changed."""
    return _owner_only(session_dir, 0o700)


def _owner_only(path: str | os.PathLike, mode: int) -> bool:
    """chmod ``path`` to ``mode`` when this user owns it and group/others have any access; else leave it."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid != os.getuid() or not stat.S_IMODE(st.st_mode) & 0o077:
        return False
    os.chmod(path, mode)
    return True


# ---------------------------------------------------------------------------------------------- redaction


def _words(key: str) -> list[str]:
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(key))  # camelCase -> camel Case
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def _secret_word(word: str) -> bool:
    return word in _SECRET_WORDS or word in _SECRET_COMPOUNDS or word.endswith(_SECRET_SUFFIXES)


def is_secret_key(key: str) -> bool:
    """True when a (possibly dotted) key names a secret: ``hf_token``, ``tracking.password``, ``apiKey``,
    ``apitoken``. The key is split into words (``.``, ``_``, ``-``, ``/``, spaces, camelCase) and each word is
    judged whole, so ``max_response_tokens`` and ``monkey`` are not secrets."""
    words = _words(key)
    pairs = zip(words, words[1:], strict=False)
    return any(_secret_word(w) for w in words) or any(p in _SECRET_PAIRS for p in pairs)


def redact_text(text: str) -> str:
    """A string with its secrets hidden: URL passwords (``scheme://user:password@host``), values of secret keys
    written ``key=value`` (``?token=abc``, ``run-hf_token=abc``) and values shaped like known credentials
    (``hf_…``, ``sk-…``, ``ghp_…``, ``AKIA…``). The one rule for every string reaching MLflow or the console."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", str(text))
    text = _INLINE_ASSIGN.sub(lambda m: f"{m['key']}{m['sep']}{REDACTED}" if is_secret_key(m["key"]) else m[0], text)
    return _TOKEN_VALUE.sub(REDACTED, text)


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` with secret-looking values hidden; nested dicts and lists are walked.

    Keys are judged by their words (``hf_token`` is secret, ``max_response_tokens`` is not); every string
    value also has URL passwords removed (``https://user:pw@host`` -> ``https://user:***REDACTED***@host``).
    """
    return {redact_text(k) if isinstance(k, str) else k:
            (REDACTED if is_secret_key(k) and v not in (None, "") else _redact_value(v)) for k, v in params.items()}


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


# ---------------------------------------------------------------------------------------------- reward specs


def check_reward_spec(spec: str, key: str = "reward.terms.N.name") -> None:
    """Raise ``ValueError`` unless ``spec`` follows the reward-reference grammar (owned by ``rewards/registry.py``:
    a registered name or ``pkg.module:function``; URLs and file paths refused). Nothing is imported."""
    from .rewards.registry import check_reward_spec as check

    check(spec, key=key)


def recipe_problems(cfg: Any) -> list[str]:
    """Security problems of a resolved recipe (duck-typed ``RecipeConfig``), each naming its key."""
    problems: list[str] = []
    for i, term in enumerate(getattr(getattr(cfg, "reward", None), "terms", []) or []):
        try:
            check_reward_spec(term.name, key=f"reward.terms.{i}.name")
        except ValueError as exc:
            problems.append(str(exc))
    return problems
