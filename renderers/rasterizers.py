"""Triangle rasterisers behind one API: nvdiffrast (CUDA) and a pure-PyTorch one (any device, CPU included).

Both take clip-space vertices `[V, Nv, 4]` (from `cameras.mvp_matrix`) and faces `[F, 3]` and offer:
- `rasterize(clip, faces, height, width) -> fragments` (which triangle covers each pixel centre);
- `interpolate(attributes, fragments) -> [V, H, W, C]` (perspective-correct, 0 on the background),
  differentiable w.r.t. the attributes and the vertex positions;
- `antialias(image, fragments) -> [V, H, W, C]`: nvdiffrast's analytic anti-aliasing of silhouette edges,
  which also carries gradients to the vertex positions through the silhouettes.

Pixel (row i, col j) is sampled at NDC ((2j + 1) / W - 1, (2i + 1) / H - 1): with the y-negated projection
of renderers/cameras.py, row 0 is the top of the picture. Nearer = smaller z / w, no face culling.

The PyTorch backend follows nvdiffrast's definitions: same sampling points and depth test; attributes
interpolated with perspective-correct barycentrics; anti-aliasing as described in nvdiffrast's
documentation and paper (for each pair of horizontally or vertically adjacent pixels covered by different
triangles, the front triangle's silhouette edge that crosses the segment between the pixel centres
blends the two colours by the crossing position). Triangles with a vertex at or behind the camera plane
(w <= 0) are dropped instead of clipped; the near / far planes are applied per pixel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from renderers.errors import UserError

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "nvdiffrast"]
BACKENDS = ("auto", "torch", "nvdiffrast")
_NOTICES_GIVEN: set[str] = set()


class RasterizerBackendError(UserError, ValueError):
    """The requested rasteriser backend cannot run here."""


class Fragments(Protocol):
    """What a rasteriser knows about one rasterised batch of views (backend-specific content)."""

    height: int
    width: int

    @property
    def mask(self) -> Tensor:
        """[V, H, W, 1] float, 1 where a triangle covers the pixel centre."""
        ...

    @property
    def face_index(self) -> Tensor:
        """[V, H, W] int64 triangle covering each pixel centre, -1 on the background."""
        ...


class Rasterizer(Protocol):
    name: str

    def rasterize(self, clip: Tensor, faces: Tensor, height: int, width: int) -> Fragments: ...

    def interpolate(self, attributes: Tensor, fragments: Fragments) -> Tensor: ...

    def antialias(self, image: Tensor, fragments: Fragments) -> Tensor: ...


# ---------------------------------------------------------------------------------------------- selection
def _notice_once(message: str) -> None:
    if message not in _NOTICES_GIVEN:
        _NOTICES_GIVEN.add(message)
        logger.warning(message)


def nvdiffrast_available() -> bool:
    """True when `nvdiffrast.torch` imports."""
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """The backend to use for tensors on `device`: "torch" or "nvdiffrast".

    "auto" picks nvdiffrast for CUDA tensors when it is installed, else the PyTorch backend with a
    one-line notice (logged once). "nvdiffrast" without CUDA raises `RasterizerBackendError`.
    """
    if backend not in BACKENDS:
        raise RasterizerBackendError(f"unknown rasteriser backend {backend!r}: use one of {', '.join(BACKENDS)}")
    device = torch.device(device) if device is not None else None
    on_cuda = device is not None and device.type == "cuda"
    if backend == "torch":
        return "torch"
    if backend == "nvdiffrast":
        if not torch.cuda.is_available():
            raise RasterizerBackendError(
                "rasteriser backend 'nvdiffrast' needs a CUDA GPU, but torch.cuda.is_available() is False; "
                "use backend='torch' (or 'auto') on this machine"
            )
        if device is not None and not on_cuda:
            raise RasterizerBackendError(
                f"rasteriser backend 'nvdiffrast' needs CUDA tensors, but the mesh is on {device}; "
                "move the model to the GPU or use backend='torch'"
            )
        if not nvdiffrast_available():
            raise RasterizerBackendError(
                "rasteriser backend 'nvdiffrast' is not installed: pip install -e '.[nvdiffrast]' "
                "(package diffrp-nvdiffrast, compiled on first use on a CUDA machine), or use backend='torch'"
            )
        return "nvdiffrast"
    # auto
    if not on_cuda:
        reason = "CUDA is not available" if not torch.cuda.is_available() else f"the mesh is on {device or 'cpu'}"
        _notice_once(f"rasteriser: {reason}, using the pure-PyTorch backend (nvdiffrast needs CUDA tensors)")
        return "torch"
    if not nvdiffrast_available():
        _notice_once(
            "rasteriser: nvdiffrast is not installed, using the pure-PyTorch backend on the GPU "
            "(faster: pip install -e '.[nvdiffrast]')"
        )
        return "torch"
    return "nvdiffrast"


_RASTERIZERS: dict[str, Rasterizer] = {}


def get_rasterizer(backend: str = "auto", device: torch.device | str | None = None) -> Rasterizer:
    """A (cached) rasteriser for tensors on `device`; see `resolve_backend`."""
    name = resolve_backend(backend, device)
    if name not in _RASTERIZERS:
        _RASTERIZERS[name] = NvdiffrastRasterizer() if name == "nvdiffrast" else TorchRasterizer()
    return _RASTERIZERS[name]


# ---------------------------------------------------------------------------------------------- helpers
def edge_opposite_vertices(faces: Tensor, num_vertices: int) -> Tensor:
    """For each face f and each k, the vertex opposite the edge (v_{k+1}, v_{k+2}) in the neighbouring
    face across that edge, `[F, 3]`; the face's own v_k on boundary edges (nvdiffrast's convention: such
    edges are always silhouettes). Non-manifold edges pair the faces in a cycle."""
    faces = faces.long()
    num_faces = faces.shape[0]
    if num_faces == 0:
        return faces.clone()
    a = faces[:, [1, 2, 0]].reshape(-1)  # edge k goes from v_{k+1} to v_{k+2}
    b = faces[:, [2, 0, 1]].reshape(-1)
    own = faces.reshape(-1)  # opposite vertex of half-edge (f, k) inside its own face
    key = torch.minimum(a, b) * num_vertices + torch.maximum(a, b)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    _, counts = torch.unique_consecutive(sorted_key, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    sizes = torch.repeat_interleave(counts, counts)
    position = torch.arange(len(order), device=faces.device) - starts
    partner_sorted = starts + (position + 1) % sizes
    partner = torch.empty_like(order)
    partner[order] = order[partner_sorted]
    return own[partner].view(num_faces, 3)


def clip_to_pixels(clip: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pixel coordinates (pixel centre (i, j) at x = j, y = i), z / w and w of clip-space points `[..., 4]`."""
    w = clip[..., 3]
    safe_w = torch.where(w.abs() > 1e-12, w, torch.full_like(w, 1e-12))
    x = (clip[..., 0] / safe_w + 1.0) * (width / 2) - 0.5
    y = (clip[..., 1] / safe_w + 1.0) * (height / 2) - 0.5
    return x, y, clip[..., 2] / safe_w, w


def _edge_functions(xs: Tensor, ys: Tensor, ids: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Edge functions `[..., 3]` of triangles (`xs, ys, ids [..., 3]`) at points `px, py [...]`.

    Function k belongs to the edge opposite vertex k and is positive on the side of vertex k for
    counter-clockwise triangles (in pixel coordinates). It is evaluated from the endpoint with the smaller
    vertex id, so two triangles sharing an edge get exactly opposite values (no cracks).
    """
    out = []
    for k in range(3):
        i, j = (k + 1) % 3, (k + 2) % 3
        swap = ids[..., i] > ids[..., j]
        ax = torch.where(swap, xs[..., j], xs[..., i])
        ay = torch.where(swap, ys[..., j], ys[..., i])
        bx = torch.where(swap, xs[..., i], xs[..., j])
        by = torch.where(swap, ys[..., i], ys[..., j])
        value = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        out.append(torch.where(swap, -value, value))
    return torch.stack(out, dim=-1)


def _same_sign(a: Tensor, b: Tensor) -> Tensor:
    """Sign bits equal (0 counts as positive), as nvdiffrast compares them."""
    return torch.signbit(a) == torch.signbit(b)


# ---------------------------------------------------------------------------------------------- PyTorch
@dataclass
class TorchFragments:
    """Rasterisation result of the PyTorch backend.

    face_index: [V, H, W] int64, -1 on the background.
    pixel: [n] flat indices (into V*H*W) of the covered pixels; vertex_ids: [n, 3]; view: [n];
    barycentric: [n, 3] perspective-correct, differentiable w.r.t. the vertex positions.
    depth_ndc: [V, H, W] z / w of the visible surface (detached; +inf on the background).
    clip: [V, Nv, 4] clip-space vertices (kept for anti-aliasing); faces: [F, 3]; opposite: [F, 3].
    """

    height: int
    width: int
    face_index: Tensor
    pixel: Tensor
    view: Tensor
    vertex_ids: Tensor
    barycentric: Tensor
    depth_ndc: Tensor
    clip: Tensor
    faces: Tensor
    opposite: Tensor
    antialias_work: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # cached by TorchRasterizer.antialias

    @property
    def num_views(self) -> int:
        return self.face_index.shape[0]

    @property
    def mask(self) -> Tensor:
        return (self.face_index >= 0)[..., None].to(self.clip.dtype)


class TorchRasterizer:
    """Pure-PyTorch rasteriser (runs anywhere, CPU included; dtype follows the vertices, float64 works).

    Args:
        max_fragments: candidate (triangle, pixel) pairs processed at once; bounds memory.
    """

    name = "torch"

    def __init__(self, max_fragments: int = 2**22) -> None:
        self.max_fragments = int(max_fragments)

    @torch.no_grad()
    def _visible_faces(self, x: Tensor, y: Tensor, z: Tensor, w: Tensor, faces: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Z-buffer: nearest face per pixel `[V*H*W]` (-1 none) and its z / w."""
        views = x.shape[0]
        device, dtype = x.device, x.dtype
        num_pixels = views * height * width
        best_depth = torch.full((num_pixels,), float("inf"), device=device, dtype=dtype)
        best_face = torch.full((num_pixels,), -1, device=device, dtype=torch.long)
        if faces.shape[0] == 0:
            return best_face, best_depth
        fx, fy, fz, fw = (t[:, faces] for t in (x, y, z, w))  # [V, F, 3]
        valid = (fw > 0).all(-1) & torch.isfinite(fx).all(-1) & torch.isfinite(fy).all(-1)
        x_lo = fx.amin(-1).ceil().clamp(0, width - 1)
        x_hi = fx.amax(-1).floor().clamp(-1, width - 1)
        y_lo = fy.amin(-1).ceil().clamp(0, height - 1)
        y_hi = fy.amax(-1).floor().clamp(-1, height - 1)
        x_lo = torch.where(valid, x_lo, torch.zeros_like(x_lo)).long()
        y_lo = torch.where(valid, y_lo, torch.zeros_like(y_lo)).long()
        n_x = torch.where(valid, x_hi.long() - x_lo + 1, torch.zeros_like(x_lo)).clamp_min(0)
        n_y = torch.where(valid, y_hi.long() - y_lo + 1, torch.zeros_like(y_lo)).clamp_min(0)
        counts = (n_x * n_y).reshape(-1)
        pairs = torch.nonzero(counts > 0).squeeze(1)  # flat (view, face)
        if pairs.numel() == 0:
            return best_face, best_depth
        pair_counts = counts[pairs]
        ends = torch.cumsum(pair_counts, 0)
        num_faces = faces.shape[0]
        start = 0
        while start < len(pairs):
            # as many pairs as fit in max_fragments (at least one)
            limit = (ends[start - 1] if start > 0 else 0) + self.max_fragments
            stop = max(start + 1, int(torch.searchsorted(ends, limit, right=True)))
            chunk = pairs[start:stop]
            chunk_counts = pair_counts[start:stop]
            start = stop
            owner = torch.repeat_interleave(torch.arange(len(chunk), device=device), chunk_counts)
            local = torch.arange(len(owner), device=device) - torch.repeat_interleave(torch.cumsum(chunk_counts, 0) - chunk_counts, chunk_counts)
            pair = chunk[owner]
            view, face = pair // num_faces, pair % num_faces
            nx = n_x.reshape(-1)[pair]
            px = (x_lo.reshape(-1)[pair] + local % nx).to(dtype)
            py = (y_lo.reshape(-1)[pair] + local // nx).to(dtype)
            xs, ys, zs = fx[view, face], fy[view, face], fz[view, face]
            ids = faces[face]
            edges = _edge_functions(xs, ys, ids, px, py)
            area = edges.sum(-1)
            inside = (((edges >= 0).all(-1)) | ((edges <= 0).all(-1))) & (area != 0)
            bary = edges / torch.where(area != 0, area, torch.ones_like(area))[:, None]
            depth = (bary * zs).sum(-1)
            inside &= (depth >= -1) & (depth <= 1)
            pixel = (view * height + py.long()) * width + px.long()
            pixel, depth, face = pixel[inside], depth[inside], face[inside]
            chunk_best = torch.full_like(best_depth, float("inf")).scatter_reduce(0, pixel, depth, "amin")
            candidate = (depth == chunk_best[pixel]) & (depth < best_depth[pixel])
            winner = torch.full_like(best_face, num_faces).scatter_reduce(0, pixel[candidate], face[candidate], "amin")
            update = winner < num_faces
            best_face = torch.where(update, winner, best_face)
            best_depth = torch.where(update, chunk_best, best_depth)
        return best_face, best_depth

    def rasterize(self, clip: Tensor, faces: Tensor, height: int, width: int) -> TorchFragments:
        """clip: [V, Nv, 4]; faces: [F, 3] -> fragments for an image of height x width."""
        faces = faces.long()
        x, y, z, w = clip_to_pixels(clip, height, width)
        face_flat, depth_flat = self._visible_faces(x.detach(), y.detach(), z.detach(), w.detach(), faces, height, width)
        views = clip.shape[0]
        pixel = torch.nonzero(face_flat >= 0).squeeze(1)
        view = pixel // (height * width)
        ids = faces[face_flat[pixel]]  # [n, 3]
        px = (pixel % width).to(clip.dtype)
        py = ((pixel // width) % height).to(clip.dtype)
        xs, ys, ws = x[view[:, None], ids], y[view[:, None], ids], w[view[:, None], ids]
        edges = _edge_functions(xs, ys, ids, px, py)
        screen_bary = edges / edges.sum(-1, keepdim=True)
        perspective = screen_bary / ws
        barycentric = perspective / perspective.sum(-1, keepdim=True)
        return TorchFragments(
            height=height,
            width=width,
            face_index=face_flat.view(views, height, width),
            pixel=pixel,
            view=view,
            vertex_ids=ids,
            barycentric=barycentric,
            depth_ndc=depth_flat.view(views, height, width),
            clip=clip,
            faces=faces,
            opposite=edge_opposite_vertices(faces, clip.shape[1]),
        )

    def interpolate(self, attributes: Tensor, fragments: TorchFragments) -> Tensor:
        """attributes: [Nv, C] (shared by the views) or [V, Nv, C] -> [V, H, W, C], 0 on the background."""
        views, height, width = fragments.num_views, fragments.height, fragments.width
        if attributes.dim() == 2:
            corner = attributes[fragments.vertex_ids]  # [n, 3, C]
        else:
            corner = attributes[fragments.view[:, None], fragments.vertex_ids]
        values = (fragments.barycentric.to(corner.dtype)[..., None] * corner).sum(1)
        out = values.new_zeros(views * height * width, values.shape[-1]).index_put((fragments.pixel,), values)
        return out.view(views, height, width, -1)

    def antialias(self, image: Tensor, fragments: TorchFragments) -> Tensor:
        """image: [V, H, W, C] -> anti-aliased [V, H, W, C] (nvdiffrast's silhouette-edge blending)."""
        views, height, width, channels = image.shape
        if fragments.antialias_work is None:  # the geometric analysis is shared by every image of these fragments
            fragments.antialias_work = self._antialias_work(fragments)
        target, pixel0, pixel1, alpha = fragments.antialias_work
        if target.numel() == 0:
            return image
        flat = image.reshape(-1, channels)
        out = flat.index_put((target,), alpha[:, None].to(flat.dtype) * (flat[pixel1] - flat[pixel0]), accumulate=True)
        return out.view(views, height, width, channels)

    def _antialias_work(self, fragments: TorchFragments) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Blends of the anti-aliasing: output pixel, the two pixels of each pair, and alpha (differentiable
        w.r.t. the vertex positions): output[target] += alpha * (image[pixel1] - image[pixel0])."""
        height, width = fragments.height, fragments.width
        x, y, _, _ = clip_to_pixels(fragments.clip, height, width)
        targets, pixels0, pixels1, alphas = [], [], [], []
        for down in (False, True):
            face = fragments.face_index
            depth = fragments.depth_ndc
            if down:
                f0, f1, z0, z1 = face[:, :-1, :], face[:, 1:, :], depth[:, :-1, :], depth[:, 1:, :]
            else:
                f0, f1, z0, z1 = face[:, :, :-1], face[:, :, 1:], depth[:, :, :-1], depth[:, :, 1:]
            v, i, j = torch.nonzero(f0 != f1, as_tuple=True)
            if v.numel() == 0:
                continue
            t0, t1 = f0[v, i, j], f1[v, i, j]
            tri = torch.where(t0 >= 0, t0, t1)
            tri = torch.where((t0 >= 0) & (t1 >= 0) & ~(z0[v, i, j] < z1[v, i, j]), t1, tri)
            front0 = tri == t0
            pixel0 = (v * height + i) * width + j
            pixel1 = pixel0 + (width if down else 1)
            # pixel coordinates relative to the centre of the pixel that holds the front triangle
            shift = (~front0).long()
            cx = (j if down else j + shift).to(x.dtype)
            cy = (i + shift if down else i).to(x.dtype)
            ids, opp = fragments.faces[tri], fragments.opposite[tri]
            px, py = x[v[:, None], ids] - cx[:, None], y[v[:, None], ids] - cy[:, None]
            ox, oy = x[v[:, None], opp] - cx[:, None], y[v[:, None], opp] - cy[:, None]
            sil = self._silhouette(px, py, ox, oy)
            if down:
                px, py = py, px
            # edge k joins v_{k+1} and v_{k+2}
            x1, y1 = px[:, [1, 2, 0]], py[:, [1, 2, 0]]
            x2, y2 = px[:, [2, 0, 1]], py[:, [2, 0, 1]]
            dx, dy = x2 - x1, y2 - y1
            sign = torch.where(front0, 1.0, -1.0).to(x.dtype)[:, None]
            crosses = ~_same_sign(y1, y2)
            safe_dy = torch.where(crosses, dy, torch.ones_like(dy))
            ratio = sign * (x1 * dy - y1 * dx) / safe_dy  # crossing distance from the front pixel, in pixels
            ratio = torch.where(crosses, ratio, torch.full_like(ratio, -float("inf")))
            k = ratio.detach().argmax(-1, keepdim=True)
            chosen = ratio.gather(1, k).squeeze(1)
            ok = crosses.gather(1, k).squeeze(1) & sil.gather(1, k).squeeze(1)
            ok &= dy.gather(1, k).squeeze(1).abs() >= dx.gather(1, k).squeeze(1).abs()
            eps = 1.0 / 16.0
            ok &= (chosen.detach() > -eps) & (chosen.detach() < 1.0 + eps)
            if not bool(ok.any()):
                continue
            dc = chosen[ok].clamp(0.0, 1.0)
            alpha = sign[ok, 0] * (0.5 - dc)
            p0, p1 = pixel0[ok], pixel1[ok]
            targets.append(torch.where(alpha.detach() > 0, p0, p1))
            pixels0.append(p0)
            pixels1.append(p1)
            alphas.append(alpha)
        if not targets:
            empty = torch.zeros(0, dtype=torch.long, device=x.device)
            return empty, empty, empty, x.new_zeros(0)
        return torch.cat(targets), torch.cat(pixels0), torch.cat(pixels1), torch.cat(alphas)

    @staticmethod
    def _silhouette(px: Tensor, py: Tensor, ox: Tensor, oy: Tensor) -> Tensor:
        """[n, 3] True where edge k of the triangle is a silhouette: the wing vertex across it lies on the
        same side as the triangle itself (the neighbour faces the other way), or there is no neighbour."""
        with torch.no_grad():
            x0, x1, x2 = px.unbind(-1)
            y0, y1, y2 = py.unbind(-1)
            ox0, ox1, ox2 = ox.unbind(-1)
            oy0, oy1, oy2 = oy.unbind(-1)
            own = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
            wings = torch.stack(
                [
                    (x1 - ox0) * (y2 - oy0) - (x2 - ox0) * (y1 - oy0),
                    (x2 - ox1) * (y0 - oy1) - (x0 - ox1) * (y2 - oy1),
                    (x0 - ox2) * (y1 - oy2) - (x1 - ox2) * (y0 - oy2),
                ],
                dim=-1,
            )
            return _same_sign(wings, own[:, None])


# ---------------------------------------------------------------------------------------------- nvdiffrast
@dataclass
class NvdiffrastFragments:
    """Rasterisation result of nvdiffrast: rast [V, H, W, 4] = (u, v, z / w, triangle id + 1)."""

    height: int
    width: int
    rast: Tensor
    clip: Tensor
    triangles: Tensor  # [F, 3] int32

    @property
    def mask(self) -> Tensor:
        return (self.rast[..., 3:] > 0).to(self.clip.dtype)

    @property
    def face_index(self) -> Tensor:
        return self.rast[..., 3].long() - 1


def _build_nvdiffrast_plugin() -> None:
    """Compile (first use) and import nvdiffrast's CUDA plugin.

    nvdiffrast 0.3.x builds its plugin with `torch.utils.cpp_extension.load` and then imports it by name;
    recent torch no longer puts the build directory on `sys.path`, so that import fails with
    ModuleNotFoundError although the plugin was built. Retry with the build directory on the path.
    """
    import sys

    from nvdiffrast.torch import ops

    try:
        ops._get_plugin()
    except ModuleNotFoundError as error:
        from torch.utils import cpp_extension

        build_dir = cpp_extension._get_build_directory(error.name, False)
        if build_dir in sys.path:
            raise
        sys.path.insert(0, build_dir)
        ops._get_plugin()


class NvdiffrastRasterizer:
    """nvdiffrast's CUDA rasteriser (float32), `RasterizeCudaContext` per device."""

    name = "nvdiffrast"

    def __init__(self) -> None:
        try:
            import nvdiffrast.torch as dr
        except Exception as error:  # noqa: BLE001
            raise RasterizerBackendError(
                f"cannot import nvdiffrast.torch ({error}); install it with pip install -e '.[nvdiffrast]' on a CUDA machine"
            ) from error
        self._dr = dr
        self._contexts: dict[torch.device, object] = {}

    def _context(self, device: torch.device):
        if device not in self._contexts:
            _build_nvdiffrast_plugin()
            self._contexts[device] = self._dr.RasterizeCudaContext(device=device)
        return self._contexts[device]

    def rasterize(self, clip: Tensor, faces: Tensor, height: int, width: int) -> NvdiffrastFragments:
        clip32 = clip.float().contiguous()
        triangles = faces.to(torch.int32).contiguous()
        if triangles.shape[0] == 0:  # nothing to draw: an all-background result
            rast = clip32.new_zeros(clip.shape[0], height, width, 4)
        else:
            rast, _ = self._dr.rasterize(self._context(clip.device), clip32, triangles, (height, width), grad_db=False)
        return NvdiffrastFragments(height, width, rast, clip32, triangles)

    def interpolate(self, attributes: Tensor, fragments: NvdiffrastFragments) -> Tensor:
        if attributes.dim() == 2:
            attributes = attributes[None]
        if fragments.triangles.shape[0] == 0:
            return attributes.new_zeros(fragments.rast.shape[0], fragments.height, fragments.width, attributes.shape[-1]).float()
        out, _ = self._dr.interpolate(attributes.float().contiguous(), fragments.rast, fragments.triangles)
        return out

    def antialias(self, image: Tensor, fragments: NvdiffrastFragments) -> Tensor:
        if fragments.triangles.shape[0] == 0:
            return image
        return self._dr.antialias(image.float().contiguous(), fragments.rast, fragments.clip, fragments.triangles)
