"""3D Gaussians decoded from the student's triplanes, centred on the triplane SDF's zero level.

    student_config: {student_class: lightning_modules.student.gaussian_field.TriplaneGaussianStudent,
                     representation: {num_gaussians: 32768, sh_degree: 0}}
    field = student.decode(latents)     # TriplaneGaussianField: a TriplaneField (SDF, deformation, colour) ...
    splats = field.gaussians()          # ... that also gives B x N Gaussians (`renderers.gaussians.Gaussians`)

How the Gaussians of one object are made (`TriplaneGaussianField.gaussian_attributes`):

1. **Anchors** (no gradient): marching cubes of the SDF on a `surface_resolution`^3 grid (the export's
   extraction, deformation included; the unit sphere when the SDF has no surface), then `num_gaussians`
   points drawn on its triangles, area-weighted, from a fixed seed: the same surface gives the same points.
2. **Centres** (differentiable): one Newton step of each anchor onto the zero level,
   `c = p - s(p) grad s(p) / |grad s(p)|^2` (the step at most 2 grid cells long). Its derivative with
   respect to the SDF values is MeshSDF's (Remelli et al., NeurIPS 2020), `dc/ds = -n / |grad s|`: the
   renders of the Gaussians move the SDF surface, which is what the GLB mesh is then extracted from.
3. **Attributes** from the triplane features at the centres, by two small MLPs (the only new weights):
   - geometry head (geometry features -> 8): opacity `sigmoid(logit(init_opacity) + o)`; scales
     `base * (1, 1, thickness) * exp(0.5 tanh(r))` with base = `scale_factor * sqrt(area / N)` (half the
     mean spacing of the anchors by default; the head adjusts within x[0.61, 1.65] only); rotation `q_n * normalise((1, 0, 0, 0) + q)`, where `q_n` turns the
     local z axis onto the SDF normal: each Gaussian starts as a flat disc tangent to the surface;
   - colour: SH degree 0 from the field's colour MLP (`sh0 = (rgb - 0.5) / C0`, so the splats and the
     mesh share one colour); with `sh_degree: 1` a colour head (texture features -> 9) adds the 3 degree-1
     coefficients per channel.
   Both heads end in a zero-initialised layer, so an untrained student's Gaussians are the defaults above.

Design, and why: the centres follow "SDF-anchored" Gaussians (the anchors-on-the-level-set idea of
GSDF / 3DGSR, with MeshSDF's iso-surface derivative) rather than the free point decoder of "Triplane
Meets Gaussian Splatting" (Zou et al., CVPR 2024): the student keeps ONE geometry, the SDF, so the same
object still exports a watertight GLB by marching cubes, the NeuS renderer can render it, the Chamfer
distance of the centres measures the SDF itself, and the only new parameters are the two heads (a
released TriplaneTurbo checkpoint fine-tunes into Gaussians without a new geometry decoder). Zou et al.'s
attribute decoding from triplane features at the points is what step 3 does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.student.config import StudentWeightsError
from lightning_modules.student.triplane_field import TriplaneField, color_activation
from lightning_modules.student.triplane_student import TriplaneStudent
from renderers.gaussians import quaternion_multiply

SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2 sqrt(pi))
GEOMETRY_OUTPUTS = 8  # opacity 1, scales 3, rotation 4
SCALE_RANGE = 0.5  # the geometry head scales each axis by exp(0.5 tanh(x)), within x[0.61, 1.65]


@dataclass(frozen=True)
class GaussianSettings:
    """The representation settings of `TriplaneGaussianStudent` (`student_config.representation`).

    num_gaussians: N per object. sh_degree: 0 or 1. surface_resolution: marching-cubes grid of the anchors.
    mlp_neurons, mlp_hidden_layers: the heads' widths. init_opacity, scale_factor, thickness: the
    untrained Gaussians (opacity; scale relative to the anchor spacing; normal-axis scale relative to the
    tangent ones). sample_seed: the seed of the anchor draw. Small Gaussians keep the surface where it is: a
    splat's silhouette reaches about one screen-space standard deviation beyond its centre, and the SDF
    retreats by as much under the teachers (the CPU demo with scale_factor 1 and 1,024 Gaussians: 0.085 on a
    sphere of radius 0.72), so the default std is half the anchors' spacing.
    """

    num_gaussians: int = 32768
    sh_degree: int = 0
    surface_resolution: int = 128
    mlp_neurons: int = 64
    mlp_hidden_layers: int = 1
    init_opacity: float = 0.9
    scale_factor: float = 0.5
    thickness: float = 0.3
    sample_seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.num_gaussians >= 1, "num_gaussians must be >= 1"),
            (self.sh_degree in (0, 1), "sh_degree must be 0 or 1"),
            (self.surface_resolution >= 8, "surface_resolution must be >= 8"),
            (self.mlp_neurons >= 1 and self.mlp_hidden_layers >= 1, "mlp_neurons and mlp_hidden_layers must be >= 1"),
            (0 < self.init_opacity < 1, "init_opacity must lie in (0, 1)"),
            (self.scale_factor > 0 and self.thickness > 0, "scale_factor and thickness must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise StudentWeightsError(f"representation: {message}, got {asdict(self)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> GaussianSettings:
        """From `StudentConfig.representation` (None: the defaults); unknown keys are a one-line error."""
        values = dict(values or {})
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise StudentWeightsError(
                f"representation: unknown setting(s) {', '.join(unknown)} of the Gaussians; known: {', '.join(known)}"
            )
        try:
            typed = {k: (float(v) if known[k] == "float" else int(v)) for k, v in values.items()}
        except (TypeError, ValueError):
            raise StudentWeightsError(f"representation: every Gaussian setting is a number, got {values}") from None
        return cls(**typed)

    @property
    def sh_coefficients(self) -> int:
        """K = (degree + 1)^2."""
        return (self.sh_degree + 1) ** 2


def attribute_head(dim_in: int, dim_out: int, neurons: int, hidden_layers: int) -> nn.Sequential:
    """Linear -> ReLU (x hidden_layers) -> Linear, with biases; the last layer starts at zero."""
    layers: list[nn.Module] = []
    width = dim_in
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, neurons), nn.ReLU()]
        width = neurons
    last = nn.Linear(width, dim_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


# ------------------------------------------------------------------------------------- geometry helpers


def sample_surface(vertices: Tensor, faces: Tensor, count: int, generator: torch.Generator) -> tuple[Tensor, float]:
    """`count` points `[count, 3]` on a triangle mesh (`vertices [V, 3]`, `faces [F, 3]`), area-weighted and
    uniform inside each triangle, drawn on the CPU from `generator`; and the mesh's total area."""
    v = vertices.detach().float().cpu()
    f = faces.long().cpu()
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    areas = torch.linalg.cross(b - a, c - a, dim=-1).norm(dim=-1) / 2
    total = float(areas.sum())
    weights = areas if total > 0 else torch.ones_like(areas)
    face = torch.multinomial(weights, count, replacement=True, generator=generator)
    u, w = torch.rand(2, count, generator=generator)
    root = u.sqrt()  # (1 - sqrt(u), sqrt(u)(1 - w), sqrt(u) w): uniform barycentric coordinates
    points = (1 - root)[:, None] * a[face] + (root * (1 - w))[:, None] * b[face] + (root * w)[:, None] * c[face]
    return points, total


def z_to_direction(normals: Tensor) -> Tensor:
    """Unit quaternions `[..., 4]` (w, x, y, z) that turn +z onto the unit vectors `normals [..., 3]` (the
    shortest arc; a half turn about x for -z)."""
    x, y, z = normals.unbind(-1)
    q = torch.stack([1 + z, -y, x, torch.zeros_like(z)], dim=-1)
    flipped = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=q.dtype, device=q.device).expand_as(q)
    q = torch.where((1 + z)[..., None] > 1e-6, q, flipped)
    return F.normalize(q, dim=-1)


# ------------------------------------------------------------------------------------------------ field


class TriplaneGaussianField(TriplaneField):
    """A `TriplaneField` (SDF, deformation, colour: marching cubes, both mesh-era renderers and GLB export
    work as before) that also gives B x N Gaussians through `gaussians()`; see the module docstring.

    Extra attributes: `geometry_head` (geometry features -> 8), `color_head` (texture features -> 9, only
    for SH degree 1, else None), `settings` (`GaussianSettings`). The Gaussians are computed once per field
    and cached (a field is one decoded batch).
    """

    def __init__(self, *args, geometry_head: nn.Module, color_head: nn.Module | None, settings: GaussianSettings,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if (color_head is None) != (settings.sh_degree == 0):
            raise ValueError("a colour head is needed for SH degree 1, and only then")
        self.geometry_head, self.color_head, self.settings = geometry_head, color_head, settings
        self._attributes: dict[str, Tensor] | None = None

    @classmethod
    def from_triplane(cls, field: TriplaneField, geometry_head: nn.Module, color_head: nn.Module | None,
                      settings: GaussianSettings) -> TriplaneGaussianField:
        """The same planes and MLPs as `field`, with the Gaussian heads."""
        return cls(field.planes, field.sdf_network, field.feature_network, field.deformation_network, field.config,
                   field.space_cache, field.triplane_raw,
                   geometry_head=geometry_head, color_head=color_head, settings=settings)

    def select(self, index: int) -> TriplaneGaussianField:
        """Object `index` alone (B = 1): the same networks on its planes."""
        return TriplaneGaussianField(
            self.planes[index : index + 1], self.sdf_network, self.feature_network, self.deformation_network,
            self.config, geometry_head=self.geometry_head, color_head=self.color_head, settings=self.settings,
        )

    # ---------------------------------------------------------------------------------- the Gaussians

    def gaussians(self):
        """`renderers.gaussians.Gaussians` of the B objects, N each (differentiable when grad is enabled)."""
        from renderers.gaussians import Gaussians

        attributes = self.gaussian_attributes()
        return Gaussians(**{name: attributes[name] for name in ("means", "quats", "scales", "opacities", "sh")})

    def gaussian_attributes(self) -> dict[str, Tensor]:
        """name -> tensor: means `[B, N, 3]`, quats `[B, N, 4]` (unit, w x y z), scales `[B, N, 3]` (standard
        deviations), opacities `[B, N]`, sh `[B, N, K, 3]`; and anchors `[B, N, 3]` (before the Newton step),
        normals `[B, N, 3]` (unit SDF gradient at the centres' anchors), spacing `[B]` (sqrt(area / N))."""
        if self._attributes is None:
            self._attributes = self._compute_attributes()
        return self._attributes

    def anchors(self) -> tuple[Tensor, Tensor]:
        """Anchor points `[B, N, 3]` on the marching-cubes surface (no gradient) and their spacing `[B]`."""
        from renderers.marching_cubes import extract_mesh

        cfg = self.settings
        meshes = extract_mesh(self, resolution=cfg.surface_resolution, empty_fallback="unit_sphere")
        points, spacing = [], []
        for mesh in meshes:
            generator = torch.Generator().manual_seed(cfg.sample_seed)
            drawn, area = sample_surface(mesh.vertices, mesh.faces, cfg.num_gaussians, generator)
            points.append(drawn)
            spacing.append(math.sqrt(max(area, 1e-12) / cfg.num_gaussians))
        device, dtype = self.planes.device, self.planes.dtype
        return torch.stack(points).to(device, dtype), torch.tensor(spacing, device=device, dtype=dtype)

    def project_to_surface(self, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """One Newton step of `anchors [B, N, 3]` onto the zero level: centres `[B, N, 3]` (with gradient to
        the SDF when grad is enabled) and unit normals `[B, N, 3]` (the SDF gradient's direction there)."""
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            points = anchors.detach().requires_grad_(True)
            sdf = self.sdf(points)
            (gradient,) = torch.autograd.grad(sdf.sum(), points, create_graph=keep_graph)
        step = sdf[..., None] * gradient / gradient.square().sum(-1, keepdim=True).clamp_min(1e-12)
        max_step = 2 * (2 * self.config.radius) / self.settings.surface_resolution  # 2 grid cells
        step = step * (max_step / step.norm(dim=-1, keepdim=True).clamp_min(max_step))
        centres = points - step
        normals = F.normalize(gradient, dim=-1)
        if not keep_graph:
            centres, normals = centres.detach(), normals.detach()
        return centres, normals

    def _compute_attributes(self) -> dict[str, Tensor]:
        cfg = self.settings
        anchors, spacing = self.anchors()
        centres, normals = self.project_to_surface(anchors)
        geometry = self.geometry_head(self.geo_features(centres))  # [B, N, 8]
        opacity_raw, scale_raw, rotation_raw = geometry.split([1, 3, 4], dim=-1)
        opacities = torch.sigmoid(opacity_raw.squeeze(-1) + math.log(cfg.init_opacity / (1 - cfg.init_opacity)))
        shape = torch.tensor([1.0, 1.0, cfg.thickness], device=centres.device, dtype=centres.dtype)
        # the head adjusts each scale within x[0.61, 1.65]: larger splats would let the teachers trade footprint for
        # surface position (a fatter silhouette, a retreating SDF), see GaussianSettings
        scales = (cfg.scale_factor * spacing)[:, None, None] * shape * torch.exp(SCALE_RANGE * torch.tanh(scale_raw))
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0], device=centres.device, dtype=centres.dtype)
        quats = quaternion_multiply(z_to_direction(normals), F.normalize(identity + rotation_raw, dim=-1))
        texture = self.tex_features(centres)
        rgb = color_activation(self.feature_network(texture))  # the field's colour, = field.color(centres)
        sh = ((rgb - 0.5) / SH_C0)[..., None, :]  # [B, N, 1, 3]
        if self.color_head is not None:
            sh = torch.cat([sh, self.color_head(texture).unflatten(-1, (3, 3))], dim=-2)  # [B, N, 4, 3]
        return dict(means=centres, quats=quats, scales=scales, opacities=opacities, sh=sh, anchors=anchors,
                    normals=normals, spacing=spacing)


# ---------------------------------------------------------------------------------------------- student


class TriplaneGaussianStudent(TriplaneStudent):
    """`TriplaneStudent` whose `decode` returns a `TriplaneGaussianField`; its settings are
    `config.representation` (`GaussianSettings`). New trainable modules: `gaussian_geometry_head`,
    `gaussian_color_head` (SH degree 1 only)."""

    trainable_prefixes = (*TriplaneStudent.trainable_prefixes, "gaussian_geometry_head.", "gaussian_color_head.")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        settings = GaussianSettings.from_dict(self.config.representation)
        geo_dim, tex_dim = self.config.field_config.feature_dims(self.config.output_dim)
        param = next(self.unet.parameters())
        head = dict(neurons=settings.mlp_neurons, hidden_layers=settings.mlp_hidden_layers)
        self.gaussian_settings = settings
        self.gaussian_geometry_head = attribute_head(geo_dim, GEOMETRY_OUTPUTS, **head).to(param.device, param.dtype)
        self.gaussian_color_head = (
            attribute_head(tex_dim, 9, **head).to(param.device, param.dtype) if settings.sh_degree == 1 else None
        )

    def decode(self, latents: Tensor) -> TriplaneGaussianField:
        """Latents `[B, 6, C, h, w]` -> `TriplaneGaussianField` (the triplane field plus its Gaussians)."""
        field = super().decode(latents)
        return TriplaneGaussianField.from_triplane(
            field, self.gaussian_geometry_head, self.gaussian_color_head, self.gaussian_settings
        )

    def field_modules(self) -> dict[str, nn.Module]:
        heads = dict(gaussian_geometry_head=self.gaussian_geometry_head, gaussian_color_head=self.gaussian_color_head)
        return {**super().field_modules(), **{name: m for name, m in heads.items() if m is not None}}

    def config_summary(self) -> str:
        settings = self.gaussian_settings
        return (
            f"{super().config_summary()}; Gaussians: {settings.num_gaussians} per object, SH degree {settings.sh_degree}, "
            f"heads {settings.mlp_neurons} wide x {settings.mlp_hidden_layers} hidden layers"
        )
