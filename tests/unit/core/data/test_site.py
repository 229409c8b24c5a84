"""What a site's error text may say: cases by index, no file names, no paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.data.site import redact_site_text


@pytest.fixture
def site(tmp_path: Path) -> Path:
    folder = tmp_path / "hospitals" / "north"
    for relative in (
        "imagesTr/smith-john_0000.nii.gz",
        "imagesTr/doe-jane_0000.nii.gz",
        "labelsTr/smith-john.nii.gz",
        "imagesTs/alpha_0000.mha",
        "labelsTs/alpha.mha",
        "atlases/imagesTr/atlas-7_0000.nii",
    ):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(b"")
    (folder / "imagesTr" / "dicom-case_0000").mkdir()
    return folder


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "{site}/imagesTr/smith-john_0000.nii.gz: truncated",
            "<site>/imagesTr/case #4: truncated",
        ),
        (
            "geometry mismatch between image {site}/imagesTs/alpha_0000.mha and label "
            "{site}/labelsTs/alpha.mha",
            "geometry mismatch between image <site>/imagesTs/case #0 and label "
            "<site>/labelsTs/case #0",
        ),
        ("second label for case 'doe-jane'", "second label for case 'case #3'"),
        ("metrics/agreement.smith-john names it", "metrics/agreement.case #4 names it"),
        (
            "{site}/imagesTr/dicom-case_0000: 1 of 10",
            "<site>/imagesTr/case #2: 1 of 10",
        ),
        ("{state}/accountant.json: bad", "<state>/accountant.json: bad"),
        ("read /etc/hosts and /home/x/y.toml", "read <path> and <path>"),
        ("atlas-7 is fine", "case #1 is fine"),
        # a case id inside a longer word is not touched
        ("smith-johnson and alphabet", "smith-johnson and alphabet"),
        ("weights 0.5/0.5 and 1/3", "weights 0.5/0.5 and 1/3"),
    ],
)
def test_redaction(site: Path, tmp_path: Path, text: str, expected: str) -> None:
    # Prepare
    state = tmp_path / "state"

    # Execute
    redacted = redact_site_text(
        text.format(site=site, state=state), site_dir=site, state_dir=state
    )

    # Assert
    assert redacted == expected


def test_redaction_without_a_site_still_drops_paths() -> None:
    # Execute / Assert
    assert redact_site_text("/data/x: not found", site_dir=None) == "<path>: not found"
