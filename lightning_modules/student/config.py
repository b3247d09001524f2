"""`StudentConfig`: the student's hyper-parameters and their `config.json`.

`config.json` uses the field names of the reference pipeline config (`TriplaneTurboTextTo3DPipelineConfig`);
values this implementation does not support are a one-line `StudentWeightsError`, never silently ignored.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_modules.student.adapters import AdapterRanks
from lightning_modules.student.triplane_field import FieldConfig
from renderers.errors import UserError

BASE_HUB_ID = "stabilityai/stable-diffusion-2-1-base"


class StudentWeightsError(UserError, ValueError):
    """A weights / config file exists but is not what the student needs (one-line message)."""


@dataclass
class StudentConfig:
    """Hyper-parameters of the student; `from_json` / `to_json` use the reference's field names.

    Defaults are the full-size released model (ranks 16/16/16, output_dim 64, MLPs 64 wide with 2 hidden
    layers, 4 x 32 x 32 noise latents per plane, 4 sampling steps).
    """

    base_model_name_or_path: str = BASE_HUB_ID
    ranks: AdapterRanks = field(default_factory=AdapterRanks)
    output_dim: int = 64
    mlp_neurons: int = 64
    mlp_hidden_layers: int = 2
    n_feature_dims: int = 3
    deformable_grid: bool = True
    field_config: FieldConfig = field(default_factory=FieldConfig)
    latent_channels: int = 4
    latent_height: int = 32
    latent_width: int = 32
    num_inference_steps: int = 4
    isosurface_resolution: int = 160
    # The student class (import path); None: TriplaneStudent. A subclass brings another representation.
    student_class: str | None = None
    # Settings of that representation (a plain dict the subclass reads, e.g. TriplaneGaussianStudent's
    # {num_gaussians: 32768, sh_degree: 0}); None: its defaults. Written to config.json with the class.
    representation: dict[str, Any] | None = None

    # Reference values that this implementation supports (anything else is an error, not silently ignored).
    _FIXED = {
        "normal_type": ("analytic",),
        "sample_scheduler": ("ddim",),
        "color_activation": ("sigmoid-mipnerf",),
        "num_results_per_prompt": (1,),
    }
    _FIXED_GENERATOR = {
        "self_lora_type": ("hexa_v1",),
        "cross_lora_type": ("vanilla",),
        "locon_type": ("vanilla_v1",),
        "vae_attn_type": ("basic",),
        "prompt_bias": (False,),
    }
    _FIXED_MLP = {"otype": ("VanillaMLP",), "activation": ("ReLU",), "output_activation": ("none",)}

    def __post_init__(self):
        if self.student_class is not None and not isinstance(self.student_class, str):
            raise StudentWeightsError(f"student_class must be an import path such as 'my_pkg.MyStudent', got {self.student_class!r}")
        if self.representation is not None and not isinstance(self.representation, dict):
            raise StudentWeightsError(f"representation must be a mapping of settings, got {self.representation!r}")
        if self.output_dim < 2 or (self.field_config.split_channels == "v1" and self.output_dim % 2):
            raise StudentWeightsError(f"output_dim must be even and >= 2, got {self.output_dim}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> StudentConfig:
        """Parse a reference pipeline-config dict (e.g. the fixture's or our own config.json)."""

        def bad(msg: str) -> StudentWeightsError:
            return StudentWeightsError(f"{source}: {msg}")

        known = {
            "base_model_name_or_path", "num_inference_steps", "num_results_per_prompt", "latent_channels",
            "latent_height", "latent_width", "num_steps_sampling", "radius", "normal_type", "sdf_bias",
            "sdf_bias_params", "rotate_planes", "split_channels", "geo_interpolate", "tex_interpolate",
            "n_feature_dims", "sample_scheduler", "mlp_network_config", "space_generator_config",
            "isosurface_deformable_grid", "isosurface_resolution", "color_activation", "student_class",
            "representation",
        }  # fmt: skip
        unknown = sorted(set(data) - known)
        if unknown:
            raise bad(f"unknown field(s) {', '.join(unknown)}; expected the reference pipeline-config fields")

        def check_fixed(section: dict, allowed: dict, where: str) -> None:
            for key, values in allowed.items():
                if key in section and section[key] not in values:
                    raise bad(f"{where}{key}={section[key]!r} is not supported (supported: {list(values)})")

        check_fixed(data, cls._FIXED, "")
        gen = dict(data.get("space_generator_config", {}))
        check_fixed(gen, cls._FIXED_GENERATOR, "space_generator_config.")
        mlp = dict(data.get("mlp_network_config", {}))
        check_fixed(mlp, cls._FIXED_MLP, "mlp_network_config.")

        defaults = cls()
        ranks = defaults.ranks
        if "training_type" in gen:
            training_type = str(gen["training_type"])
            if "with_bias" in training_type or "full" in training_type:
                raise bad(f"space_generator_config.training_type={training_type!r} is not supported")
            found = {}
            for key in ("self_lora", "cross_lora", "locon"):
                match = re.search(rf"{key}_rank_(\d+)", training_type)
                if match is None:
                    raise bad(
                        f"space_generator_config.training_type={training_type!r} lacks '{key}_rank_<r>'"
                    )
                found[key] = int(match.group(1))
            ranks = AdapterRanks(found["self_lora"], found["cross_lora"], found["locon"])
        try:
            field_cfg = FieldConfig(
                radius=float(data.get("radius", 1.0)),
                sdf_bias=data.get("sdf_bias", "sphere"),
                sdf_bias_params=data.get("sdf_bias_params", 0.5),
                rotate_planes=data.get("rotate_planes", "v1"),
                split_channels=data.get("split_channels", "v1"),
                geo_interpolate=data.get("geo_interpolate", "v1"),
                tex_interpolate=data.get("tex_interpolate", "v2"),
            )
        except ValueError as err:
            raise bad(str(err)) from None
        return cls(
            base_model_name_or_path=str(
                data.get("base_model_name_or_path", defaults.base_model_name_or_path)
            ),
            ranks=ranks,
            output_dim=int(gen.get("output_dim", defaults.output_dim)),
            mlp_neurons=int(mlp.get("n_neurons", defaults.mlp_neurons)),
            mlp_hidden_layers=int(mlp.get("n_hidden_layers", defaults.mlp_hidden_layers)),
            n_feature_dims=int(data.get("n_feature_dims", defaults.n_feature_dims)),
            deformable_grid=bool(data.get("isosurface_deformable_grid", True)),
            field_config=field_cfg,
            latent_channels=int(data.get("latent_channels", defaults.latent_channels)),
            latent_height=int(data.get("latent_height", defaults.latent_height)),
            latent_width=int(data.get("latent_width", defaults.latent_width)),
            num_inference_steps=int(data.get("num_inference_steps", defaults.num_inference_steps)),
            isosurface_resolution=int(data.get("isosurface_resolution", defaults.isosurface_resolution)),
            student_class=data.get("student_class"),
            representation=dict(data["representation"]) if isinstance(data.get("representation"), dict) else data.get("representation"),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> StudentConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StudentWeightsError(f"cannot read config {path}: {_one_line(err)}") from None
        if not isinstance(data, dict):
            raise StudentWeightsError(f"config {path} must hold a JSON object")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The reference pipeline-config dict (same field names and order as the fixture's config.json)."""
        r = self.ranks
        return {
            "base_model_name_or_path": self.base_model_name_or_path,
            "num_inference_steps": self.num_inference_steps,
            "num_results_per_prompt": 1,
            "latent_channels": self.latent_channels,
            "latent_height": self.latent_height,
            "latent_width": self.latent_width,
            "num_steps_sampling": self.num_inference_steps,
            "radius": self.field_config.radius,
            "normal_type": "analytic",
            "sdf_bias": self.field_config.sdf_bias,
            "sdf_bias_params": self.field_config.sdf_bias_params,
            "rotate_planes": self.field_config.rotate_planes,
            "split_channels": self.field_config.split_channels,
            "geo_interpolate": self.field_config.geo_interpolate,
            "tex_interpolate": self.field_config.tex_interpolate,
            "n_feature_dims": self.n_feature_dims,
            "sample_scheduler": "ddim",
            "mlp_network_config": {
                "otype": "VanillaMLP",
                "activation": "ReLU",
                "output_activation": "none",
                "n_neurons": self.mlp_neurons,
                "n_hidden_layers": self.mlp_hidden_layers,
            },
            "space_generator_config": {
                "training_type": f"self_lora_rank_{r.self_attn}-cross_lora_rank_{r.cross_attn}-locon_rank_{r.locon}",
                "output_dim": self.output_dim,
                "self_lora_type": "hexa_v1",
                "cross_lora_type": "vanilla",
                "locon_type": "vanilla_v1",
                "prompt_bias": False,
                "vae_attn_type": "basic",
            },
            "isosurface_deformable_grid": self.deformable_grid,
            "isosurface_resolution": self.isosurface_resolution,
            "color_activation": "sigmoid-mipnerf",
        } | ({"student_class": self.student_class} if self.student_class is not None else {}) | (
            {"representation": dict(self.representation)} if self.representation is not None else {}
        )

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."
