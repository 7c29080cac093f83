"""The Peterson & Barney (1952) vowels of the 1991 paper.

Shape legend: N rows.

The vowel data is built offline by the Praat bundled in praat-parselmouth; nothing is downloaded.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moekit.exceptions import VowelLabelError

# The paper's four vowels, as Praat codes them, and the labels the paper prints.
VOWEL_CODES = ("iy", "ih", "aa", "ah")  # heed, hid, hod, hud
VOWEL_LABELS = ("[i]", "[I]", "[a]", "[\u039b]")
# Speaker 1's first tokens of hod and hud (F1, F2 in Hz) in the 1952 table. Praat builds from about
# 2004 to January 2008 swapped the aa/ah labels; this row tells the two apart.
_KNOWN_HOD_F1_F2 = (740.0, 1070.0)
_KNOWN_HUD_F1_F2 = (590.0, 1250.0)


_PRAAT_COLUMNS = {"speaker": "Speaker", "type": "Type", "sex": "Sex", "vowel": "Vowel",
                  "ipa": "IPA", "f0": "F0", "f1": "F1", "f2": "F2", "f3": "F3"}


@dataclass(frozen=True)
class FormantTable:
    """The Peterson & Barney (1952) table, tidy: one row per token, one array per column.

    Columns: speaker (1-76), type ('m' man, 'w' woman, 'c' child), sex ('m'/'f'), vowel (Praat's
    code: iy ih eh ae aa ao uh uw ah er), ipa (Praat's IPA notation), f0-f3 (Hz).
    """

    speaker: np.ndarray
    type: np.ndarray
    sex: np.ndarray
    vowel: np.ndarray
    ipa: np.ndarray
    f0: np.ndarray
    f1: np.ndarray
    f2: np.ndarray
    f3: np.ndarray

    def __len__(self) -> int:
        return len(self.speaker)

    def select(self, mask: np.ndarray) -> FormantTable:
        """The rows where ``mask`` is true."""
        return FormantTable(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})

    def to_records(self) -> list[dict[str, object]]:
        names = [f.name for f in fields(self)]
        return [dict(zip(names, (getattr(self, n)[i].item() for n in names), strict=True))
                for i in range(len(self))]


def peterson_barney() -> FormantTable:
    """Build the Peterson & Barney (1952) formant table through praat-parselmouth (no download).

    Raises:
        VowelLabelError: if the hod/hud (aa/ah) labels look swapped, as in some Praat builds.

    Example:
        >>> table = peterson_barney()
        >>> len(table), sorted(set(table.vowel.tolist()))[:3]
        (1520, ['aa', 'ae', 'ah'])
    """
    from parselmouth.praat import call  # imported here: only the vowel task needs Praat

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pb.tsv"
        table = call("Create formant table (Peterson & Barney 1952)")
        call(table, "Save as tab-separated file", str(path))
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    columns = {name: np.array([r[praat_name] for r in rows])
               for name, praat_name in _PRAAT_COLUMNS.items()}
    formants = FormantTable(
        speaker=columns["speaker"].astype(int), type=columns["type"], sex=columns["sex"],
        vowel=columns["vowel"], ipa=columns["ipa"],
        **{f: columns[f].astype(float) for f in ("f0", "f1", "f2", "f3")},
    )
    check_vowel_labels(formants)
    return formants


def check_vowel_labels(table: FormantTable) -> None:
    """Fail loudly if hod (aa) and hud (ah) look swapped: check speaker 1's first token of each."""
    for code, want, other in (("aa", _KNOWN_HOD_F1_F2, _KNOWN_HUD_F1_F2),
                              ("ah", _KNOWN_HUD_F1_F2, _KNOWN_HOD_F1_F2)):
        rows = np.flatnonzero((table.speaker == 1) & (table.vowel == code))
        if rows.size == 0:
            raise VowelLabelError(f"peterson_barney: speaker 1 has no {code!r} token; the table is "
                                  "not the Peterson & Barney (1952) table moekit expects.")
        got = (table.f1[rows[0]], table.f2[rows[0]])
        if got == other:
            raise VowelLabelError(
                f"peterson_barney: the aa/ah labels are swapped in this Praat build (speaker 1's "
                f"first {code!r} token has F1, F2 = {got}, which belongs to the other vowel). "
                "Praat builds from about 2004 to January 2008 had this bug; upgrade "
                "praat-parselmouth.")
        if got != want:
            raise VowelLabelError(f"peterson_barney: speaker 1's first {code!r} token has F1, F2 = "
                                  f"{got}; expected {want}. The table differs from the 1952 data.")


@dataclass(frozen=True)
class VowelTask:
    """The 1991 paper's task: classify [i], [I], [a], [\u039b] from (F1, F2) / 1000.

    Tensors are float64 inputs (N, 2) and long class indices (N,) into ``labels``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    speakers_train: np.ndarray
    speakers_test: np.ndarray
    codes: tuple[str, ...] = VOWEL_CODES
    labels: tuple[str, ...] = VOWEL_LABELS


def vowel_task(*, train_speakers: Sequence[int] = range(1, 51),
               test_speakers: Sequence[int] = range(51, 76), include_speaker_76: bool = False,
               table: FormantTable | None = None) -> VowelTask:
    """The vowel task of Jacobs et al. (1991): speakers 1-50 train, 51-75 test (76 optional).

    The paper says 75 speakers; every known copy has 76, so speaker 76 is left out unless asked for.

    Example:
        >>> task = vowel_task()
        >>> task.x_train.shape, task.x_test.shape
        (torch.Size([400, 2]), torch.Size([200, 2]))
    """
    table = table if table is not None else peterson_barney()
    test = list(test_speakers) + ([76] if include_speaker_76 and 76 not in test_speakers else [])
    overlap = sorted(set(train_speakers) & set(test))
    if overlap:
        raise ValueError(f"vowel_task: speakers {overlap} are in both train_speakers and "
                         "test_speakers.")
    table = table.select(np.isin(table.vowel, VOWEL_CODES))
    class_of = {code: i for i, code in enumerate(VOWEL_CODES)}

    def split(speakers: Sequence[int]) -> tuple[Tensor, Tensor, np.ndarray]:
        part = table.select(np.isin(table.speaker, list(speakers)))
        x = torch.tensor(np.stack([part.f1, part.f2], axis=1) / 1000.0, dtype=torch.float64)
        y = torch.tensor([class_of[v] for v in part.vowel], dtype=torch.long)
        return x, y, part.speaker

    x_train, y_train, s_train = split(train_speakers)
    x_test, y_test, s_test = split(test)
    return VowelTask(x_train, y_train, x_test, y_test, s_train, s_test)
