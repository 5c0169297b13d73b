"""The demo's synthetic chest film: a procedural radiograph phantom (body, lungs, ribs, spine, heart) on which each
of the 14 findings, when present, has its own look, place and size (demo_data.FINDING_LOOKS says which)."""

import numpy as np
from PIL import Image, ImageFilter

from dataset import FINDINGS


def ellipse(x, y, cx, cy, rx, ry, edge=12.0):
    """Soft-edged ellipse mask in [0, 1] (soft edges keep the phantom free of aliasing at any size)."""
    distance = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - distance) * edge, 0.0, 1.0)


def smooth_noise(rng, size, cells):
    """Low-frequency texture in [-1, 1]: random cells upsampled bicubically."""
    coarse = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    fine = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(fine, dtype=np.float32) / 127.5 - 1.0


def band(x, y, cx, cy, length, width, angle):
    """A soft straight band (a rotated thin ellipse) in [0, 1]."""
    cos, sin = np.cos(angle), np.sin(angle)
    along, across = (x - cx) * cos + (y - cy) * sin, -(x - cx) * sin + (y - cy) * cos
    return np.clip((1 - np.sqrt((along / length) ** 2 + (across / width) ** 2)) * 6, 0, 1)


class Phantom:
    """One film being drawn: coordinates over [-1, 1] (y down), the patient's left on the image's right (PA)."""

    def __init__(self, rng, size, anatomy, findings):
        self.rng, self.size, self.findings = rng, size, findings
        axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        self.x, self.y = np.meshgrid(axis, axis)
        self.boxes = {}
        width = anatomy["body_width"]
        self.lung_x = (-0.36 * width, 0.36 * width)
        self.lung_rx, self.lung_ry, self.lung_cy = 0.26, anatomy["lung_height"], -0.08
        if "Emphysema" in findings:  # hyperinflation: larger lungs, diaphragms pushed down and flattened
            self.lung_rx, self.lung_ry, self.lung_cy = 0.285, self.lung_ry * 1.16, -0.02
        if "Fibrosis" in findings:  # volume loss
            self.lung_ry *= 0.93
        self.body = ellipse(self.x, self.y, 0.0, 0.1, width, 1.05)
        self.lungs = [
            ellipse(
                self.x, self.y, cx, self.lung_cy, self.lung_rx, self.lung_ry, 12 if "Emphysema" not in findings else 30
            )
            for cx in self.lung_x
        ]
        self.lung = np.maximum(*self.lungs)
        self.anatomy = anatomy

    def box(self, finding, cx, cy, rx, ry):
        """Record the pixel box (x, y, w, h) of a drawn finding from its [-1, 1] centre and radii."""
        scale = (self.size - 1) / 2
        self.boxes[finding] = tuple(
            round(float(value), 1)
            for value in ((cx - rx + 1) * scale, (cy - ry + 1) * scale, 2 * rx * scale, 2 * ry * scale)
        )

    def draw(self):
        """uint8 [size, size] and {finding: box} of the boxed findings."""
        rng, x, y, findings = self.rng, self.x, self.y, self.findings
        noise = rng.normal(0, 0.025, x.shape).astype(np.float32)  # first: the findings leave the film's noise alone
        image = np.full(x.shape, 0.05, np.float32) + 0.45 * self.body
        darkness = 0.36 if "Emphysema" in findings else 0.28
        markings = 0.15 * smooth_noise(rng, self.size, 12) * (0.4 if "Emphysema" in findings else 1.0)
        image -= darkness * self.lung * (1.0 + markings)
        for k in range(8):  # posterior ribs: arcs across each lung
            arc = y - (-0.62 + 0.15 * k + 0.18 * x**2)
            image += 0.09 * np.clip(1 - np.abs(arc) / 0.025, 0, 1) * self.body
        image += 0.22 * np.clip(1 - np.abs(x) / 0.07, 0, 1) * self.body  # spine
        image = self._heart(image)
        for finding in FINDINGS:
            if finding in findings and hasattr(self, f"_{finding.lower()}"):
                image = getattr(self, f"_{finding.lower()}")(image)
        image = image * self.anatomy["exposure"] + noise
        pixels = Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8))
        return np.asarray(pixels.filter(ImageFilter.GaussianBlur(self.size / 256))), self.boxes

    def _heart(self, image):
        radius = self.anatomy["heart_radius"] * (self.rng.uniform(1.4, 1.6) if "Cardiomegaly" in self.findings else 1)
        heart = ellipse(self.x, self.y, 0.1, 0.22, radius, radius * 0.85)
        self.outside_heart = 1 - heart
        if "Cardiomegaly" in self.findings:
            self.box("Cardiomegaly", 0.1, 0.22, radius, radius * 0.85)
        return image * (1 - heart) + 0.62 * heart

    def _side(self):
        side = int(self.rng.integers(2))
        return side, self.lung_x[side]

    def _atelectasis(self, image):
        side, cx = self._side()
        cx, cy = cx + self.rng.uniform(-0.05, 0.05), self.rng.uniform(0.02, 0.25)
        length, width = self.rng.uniform(0.18, 0.24), self.rng.uniform(0.025, 0.04)
        angle = np.deg2rad(self.rng.uniform(10, 30)) * (1 if side else -1)
        image += 0.3 * band(self.x, self.y, cx, cy, length, width, angle) * self.lungs[side]
        self.box("Atelectasis", cx, cy, length * abs(np.cos(angle)) + width, length * abs(np.sin(angle)) + width)
        return image

    def _effusion(self, image):
        sides = [0, 1] if self.rng.random() < 0.2 else [int(self.rng.integers(2))]
        for side in sides:
            level = self.rng.uniform(0.05, 0.25) - 0.35 * np.abs(self.x - self.lung_x[side])
            fluid = self.lungs[side] * np.clip((self.y - level) * 20, 0, 1)
            image = image * (1 - fluid) + 0.58 * fluid
        low, high = min(self.lung_x[s] for s in sides), max(self.lung_x[s] for s in sides)
        self.box("Effusion", (low + high) / 2, self.lung_cy + self.lung_ry * 0.6, (high - low) / 2 + 0.26, 0.25)
        return image

    def _infiltration(self, image):
        side, cx = self._side()
        cx, cy, radius = cx + self.rng.uniform(-0.08, 0.08), self.rng.uniform(-0.35, 0.2), self.rng.uniform(0.18, 0.26)
        patches = np.clip(0.4 + 1.2 * smooth_noise(self.rng, self.size, 14), 0, 1)
        image += 0.2 * patches * ellipse(self.x, self.y, cx, cy, radius, radius, 3) * self.lungs[side]
        self.box("Infiltration", cx, cy, radius, radius)
        return image

    def _mass(self, image):
        return self._round_opacity(image, "Mass", (0.10, 0.15), (0.3, 0.42))

    def _nodule(self, image):
        return self._round_opacity(image, "Nodule", (0.035, 0.055), (0.4, 0.55))

    def _round_opacity(self, image, finding, radii, strength):
        radius = self.rng.uniform(*radii)
        cx = self.lung_x[self.rng.integers(2)] + self.rng.uniform(-0.1, 0.1)
        cy = self.rng.uniform(-0.4, 0.15)
        image += self.rng.uniform(*strength) * ellipse(self.x, self.y, cx, cy, radius, radius)
        self.box(finding, cx, cy, radius, radius)
        return image

    def _pneumonia(self, image):
        side, cx = self._side()
        cx, cy = cx + self.rng.uniform(-0.06, 0.06), self.rng.uniform(0.08, 0.25)
        rx, ry = self.rng.uniform(0.15, 0.2), self.rng.uniform(0.13, 0.18)
        blob = ellipse(self.x, self.y, cx, cy, rx, ry, 4) * self.lungs[side]
        image = image * (1 - blob) + 0.6 * blob
        for _ in range(3):  # air bronchograms: dark branches running out from the hilum
            angle = np.deg2rad(self.rng.uniform(40, 140))
            branch = band(self.x, self.y, cx, cy - 0.03, rx * 0.8, 0.012, angle)
            image -= 0.25 * branch * blob
        self.box("Pneumonia", cx, cy, rx, ry)
        return image

    def _pneumothorax(self, image):
        side, cx = self._side()
        outside = self.lungs[side] * (np.abs(self.x - cx) * 0.9 + (0.2 - self.y) * 0.6 > self.rng.uniform(0.35, 0.45))
        image = np.where(outside > 0.5, 0.03, image)
        self.box("Pneumothorax", cx + np.sign(cx) * 0.12, -0.35, 0.16, 0.25)
        return image

    def _consolidation(self, image):
        side, cx = self._side()
        cx, fissure = cx + self.rng.uniform(-0.05, 0.05), self.rng.uniform(-0.2, 0.0)
        region = ellipse(self.x, self.y, cx, fissure - 0.12, 0.2, 0.2, 4) * np.clip((fissure - self.y) * 40, 0, 1)
        region *= self.lungs[side]
        return image * (1 - region) + 0.55 * region

    def _edema(self, image):
        for hilum in (-0.2, 0.2):
            haze = np.exp(
                -(((self.x - hilum * self.anatomy["body_width"] / 0.85) / 0.2) ** 2) - ((self.y - 0.0) / 0.28) ** 2
            )
            image += 0.22 * haze * self.lung * self.outside_heart
        for cx in self.lung_x:  # Kerley B lines: short horizontal lines at the outer lung bases
            edge = cx + np.sign(cx) * 0.17
            for k in range(4):
                line = band(self.x, self.y, edge, 0.12 + 0.06 * k, 0.05, 0.008, 0.0)
                image += 0.25 * line * self.lung * self.outside_heart
        return image

    def _fibrosis(self, image):
        period = self.rng.uniform(0.11, 0.13)
        warp = 0.04 * smooth_noise(self.rng, self.size, 6)
        net = np.maximum(
            np.clip(1 - np.abs(np.sin(np.pi * (self.x + warp) / period)) / 0.3, 0, 1),
            np.clip(1 - np.abs(np.sin(np.pi * (self.y - warp) / period)) / 0.3, 0, 1),
        )
        lower_outer = np.clip((self.y + 0.05) * 3, 0, 1) * np.clip((np.abs(self.x) - 0.2) * 4, 0, 1)
        return image + 0.3 * net * lower_outer * self.lung * self.outside_heart

    def _pleural_thickening(self, image):
        side, cx = self._side()
        thickness = self.rng.uniform(0.03, 0.05)
        outer = ellipse(self.x, self.y, cx, self.lung_cy, self.lung_rx, self.lung_ry, 30)
        inner = ellipse(self.x, self.y, cx, self.lung_cy, self.lung_rx - thickness, self.lung_ry - thickness, 30)
        rim = np.clip(outer - inner, 0, 1) * np.clip(np.sign(cx) * (self.x - cx) * 8 + 0.5, 0, 1)
        rim *= np.clip((0.15 - self.y) * 5, 0, 1)  # the outer wall and the apex, not the diaphragm
        return image + 0.35 * rim

    def _hernia(self, image):
        cx, cy, radius = self.rng.uniform(0.0, 0.08), self.rng.uniform(0.3, 0.38), self.rng.uniform(0.07, 0.1)
        bubble = ellipse(self.x, self.y, cx, cy, radius, radius, 20)
        gas = bubble * (self.y < cy + self.rng.uniform(-0.02, 0.03))  # an air-fluid level
        image = image * (1 - bubble) + 0.5 * bubble
        return image * (1 - gas) + 0.12 * gas
