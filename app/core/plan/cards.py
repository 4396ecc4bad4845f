"""NVIDIA cards: what each can do for training, from the shipped catalogue or from this machine.

`resources/cards.toml` lists popular cards with their memory, compute capability, bf16 and
FlashAttention-2 support, so a plan can be made for a card the user does not have
(`tunesmith plan --gpu "RTX 3060"`). `detected_card()` reads this machine's first card through
NVML, in milliseconds and without importing torch; what NVML reports (memory, capability) wins
over the catalogue row of the same name. `precision_for(card)` turns a card into the compute dtype
a run uses: bf16 where the card has it, fp16 with a gradient scaler on Volta and Turing, and a
refusal below compute capability 7.0.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from functools import cache

from app.core import host
from app.core.errors import ConfigError
from app.core.resources import resources_dir
from app.core.toml import load_toml

MIB = 1024 ** 2
# bitsandbytes' 4-bit kernels and PyTorch's CUDA builds need Volta (sm70) or newer.
MIN_CAPABILITY = (7, 0)
BF16_CAPABILITY = (8, 0)
FLASH_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Card:
    """One NVIDIA card as planning sees it."""

    name: str
    memory_bytes: int
    capability: tuple[int, int]
    bf16: bool
    flash_attention_2: bool
    source: str = "catalogue"  # "catalogue" or "detected"
    aliases: tuple[str, ...] = ()

    @property
    def capability_text(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 1024 ** 3

    def to_dict(self) -> dict:
        return {"name": self.name, "memory_bytes": self.memory_bytes, "capability": self.capability_text,
                "bf16": self.bf16, "flash_attention_2": self.flash_attention_2, "source": self.source}


@cache
def card_catalog() -> tuple[Card, ...]:
    """Every catalogued card, in file order."""
    table = load_toml(resources_dir() / "cards.toml")
    cards = []
    for row in table.get("card", []):
        major, minor = (int(part) for part in str(row["capability"]).split("."))
        cards.append(Card(row["name"], int(row["memory_mib"]) * MIB, (major, minor), bool(row["bf16"]),
                          bool(row["flash_attention_2"]), "catalogue", tuple(row.get("aliases", ()))))
    return tuple(cards)


def find_card(name: str) -> Card:
    """The catalogued card called `name` (or one of its aliases; case, spaces, dashes and
    "NVIDIA GeForce" ignored). ConfigError naming the closest names when there is none."""
    card = match_card(name)
    if card is not None:
        return card
    names = {_key(label): card.name for card in card_catalog() for label in (card.name, *card.aliases)}
    close = difflib.get_close_matches(_key(name), list(names), n=3, cutoff=0.5)
    suggestion = ", ".join(dict.fromkeys(f'"{names[key]}"' for key in close))
    hint = f"closest: {suggestion}" if suggestion else "run `tunesmith gpu --list` for every card"
    raise ConfigError(f'no card called "{name}" in the catalogue; {hint}. For another card, use a '
                      "memory preset (--preset 24gb)")


def match_card(name: str) -> Card | None:
    """The catalogued card whose name or alias is `name` once normalised, else None. Driver names
    such as "NVIDIA GeForce RTX 4090" and "Tesla T4" match "RTX 4090" and "T4"."""
    wanted = _key(name)
    for card in card_catalog():
        if wanted in {_key(label) for label in (card.name, *card.aliases)}:
            return card
    return None


def detected_card(index: int = 0) -> Card | None:
    """This machine's card `index` as NVML reports it (memory, compute capability), completed from
    the catalogue row of the same name; None without an NVIDIA driver. No torch import."""
    report = host.gpus()
    if not report.available or index >= len(report.gpus):
        return None
    gpu = report.gpus[index]
    known = match_card(gpu.name)
    capability = getattr(gpu, "capability", None) or (known.capability if known else None)
    if capability is None:
        return None  # neither NVML nor the catalogue knows what this card can do: torch will say
    memory = gpu.total_bytes or (known.memory_bytes if known else 0)
    if known is not None and tuple(capability) == known.capability:
        return replace(known, name=_short_name(gpu.name), memory_bytes=memory, source="detected")
    return card_from_capability(_short_name(gpu.name), memory, tuple(capability), "detected")


def card_from_capability(name: str, memory_bytes: int, capability: tuple[int, int],
                         source: str = "detected") -> Card:
    """A card known only by its capability (e.g. what torch reports for an uncatalogued card)."""
    return Card(name, memory_bytes, capability, capability >= BF16_CAPABILITY,
                capability >= FLASH_CAPABILITY, source)


def check_trainable(card: Card) -> None:
    """ConfigError when `card` is too old for 4-bit training."""
    if card.capability < MIN_CAPABILITY:
        raise ConfigError(f"{card.name} (compute capability {card.capability_text}) is too old for "
                          "QLoRA training: the 4-bit kernels and PyTorch need 7.0 (Volta, RTX 20-series) "
                          "or newer; use a newer card or a rented one")


def precision_for(card: Card | None) -> tuple[str, str]:
    """(compute dtype, reason) for training on `card` (None: a card of unknown kind)."""
    if card is None:
        return "bfloat16", ("bf16: card not known, assumed Ampere or newer; name it with --gpu "
                            "for a plan that checks")
    check_trainable(card)
    if card.bf16:
        return "bfloat16", f"bf16: {card.name} (compute {card.capability_text}) has it"
    return "float16", (f"fp16 with a gradient scaler: {card.name} (compute {card.capability_text}) has "
                       "no bf16; LoRA weights stay fp32")


def _key(name: str) -> str:
    text = name.lower()
    for noise in ("nvidia", "geforce", "tesla", "generation", "laptop gpu", "pcie", "sxm"):
        text = text.replace(noise, "")
    return re.sub(r"[^a-z0-9]", "", text)


def _short_name(name: str) -> str:
    return re.sub(r"^NVIDIA (GeForce )?", "", name).strip() or name
