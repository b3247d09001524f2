"""The field protocol (`renderers.types.Field`) and a second representation brought in by `student_class`."""

import json

import pytest
import torch
from torch import nn

from lightning_modules.student import TriplaneStudent
from lightning_modules.student.config import StudentConfig, StudentWeightsError
from lightning_modules.student.generation import generate_meshes
from lightning_modules.student.triplane_field import TriplaneField, VanillaMLP
from lightning_modules.training.settings import resolve_student_config
from renderers.cameras import evaluation_cameras
from renderers.mesh_renderer import MeshRenderer
from renderers.types import Field, FieldWithSharedGeometry
from teachers.shapes import ShapeField, parse_shape_prompt
from tests.prd_helpers import TINY_STUDENT


class ProtocolOnlyField:
    """A representation that offers the protocol and nothing else (no planes, no shared geometry lookup)."""

    def __init__(self, inner: TriplaneField, tint: torch.Tensor) -> None:
        self._inner, self._tint = inner, tint

    @property
    def batch_size(self) -> int:
        return self._inner.batch_size

    def sdf(self, points):
        return self._inner.sdf(points)

    def deformation(self, points):
        return self._inner.deformation(points)

    def color(self, points):
        return (self._inner.color(points) + self._tint).clamp(0, 1)  # its own colours


class ProtocolOnlyStudent(TriplaneStudent):
    """The student of that representation: the same generator, another decode, one more trainable tensor."""

    trainable_prefixes = (*TriplaneStudent.trainable_prefixes, "tint")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tint = nn.Parameter(torch.zeros(3))

    def decode(self, latents):
        return ProtocolOnlyField(super().decode(latents), self.tint)


STUDENT_CLASS = f"{__name__}.ProtocolOnlyStudent"


def test_the_project_fields_satisfy_the_field_protocol():
    planes = torch.randn(2, 6, 4, 8, 8)
    triplane = TriplaneField(planes, VanillaMLP(4, 1, 8, 1), VanillaMLP(12, 3, 8, 1), VanillaMLP(4, 3, 8, 1))
    assert isinstance(triplane, FieldWithSharedGeometry) and triplane.batch_size == 2
    shapes = ShapeField([parse_shape_prompt("a red ball")])
    assert isinstance(shapes, Field) and not isinstance(shapes, FieldWithSharedGeometry)
    assert not isinstance(object(), Field)


def test_a_student_class_in_the_config_brings_another_representation(tiny_sd_dir, tmp_path):
    config = resolve_student_config({**TINY_STUDENT, "student_class": STUDENT_CLASS})
    student = TriplaneStudent.from_pretrained(tiny_sd_dir, config=config)
    assert type(student) is ProtocolOnlyStudent and "tint" in student.trainable_state_dict()
    with torch.no_grad():
        student.tint.fill_(0.25)
        field = student.sample(student.encode_prompt(["a red ball", "a blue cube"]), seed=0)
        assert isinstance(field, Field) and not isinstance(field, FieldWithSharedGeometry)
        render = MeshRenderer(resolution=12, backend="torch")(field, evaluation_cameras(2, batch_size=2, height=16, width=16))
    assert render["rgb"].shape == (2, 2, 3, 16, 16)

    # the class travels with the weights: config.json names it, and loading builds it again
    directory = student.save_pretrained(tmp_path / "weights")
    assert json.loads((directory / "config.json").read_text())["student_class"] == STUDENT_CLASS
    again = TriplaneStudent.from_pretrained(tiny_sd_dir, weights=directory)
    assert type(again) is ProtocolOnlyStudent and again.config == student.config
    assert torch.equal(again.tint, student.tint)
    records = generate_meshes(again, ["a red ball", "a blue cube"], tmp_path / "meshes", resolution=12, progress=False)
    assert [(tmp_path / "meshes" / r["file"]).is_file() for r in records] == [True, True]


def test_the_default_config_json_names_no_class():
    assert "student_class" not in StudentConfig().to_dict()
    assert StudentConfig.from_dict(StudentConfig().to_dict()) == StudentConfig()


@pytest.mark.parametrize(
    "student_class, message",
    [("no_such_package.Student", "cannot be imported"), ("torch.nn.Linear", "is not a subclass of TriplaneStudent")],
)
def test_a_bad_student_class_is_a_one_line_error(tiny_sd_dir, student_class, message):
    config = StudentConfig(**{**resolve_student_config(dict(TINY_STUDENT)).__dict__, "student_class": student_class})
    with pytest.raises(StudentWeightsError, match=message) as err:
        TriplaneStudent.from_pretrained(tiny_sd_dir, config=config)
    assert "\n" not in str(err.value)
