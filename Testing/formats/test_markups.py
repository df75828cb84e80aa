"""Slicer markups JSON: files written by Slicer's own storage nodes read back in RAS."""

from __future__ import annotations

import json

import numpy as np
import pytest
from slicer_headless import slicer_scene_fixture

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.markups import Roi, read_points, read_roi, write_points, write_roi

slicer_scene = pytest.fixture(slicer_scene_fixture)

POINTS_RAS = np.array([[1.5, -2.0, 3.25], [40.0, 5.5, -6.0], [-7.0, 8.0, 90.5]])
SYSTEMS = ["LPS", "RAS"]


def save_node(scene, node, path, system: str) -> None:
    """Save a markups node with its default (JSON) storage node in ``system``."""
    slicer = scene.slicer
    assert node.AddDefaultStorageNode()
    storage = node.GetStorageNode()
    assert storage is not None and storage.IsA("vtkMRMLMarkupsJsonStorageNode")
    storage.SetCoordinateSystem(getattr(slicer.vtkMRMLStorageNode, f"CoordinateSystem{system}"))
    storage.SetFileName(str(path))
    assert storage.WriteData(node)


def point_list(scene, points, labels=None):
    node = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    for n, point in enumerate(points):
        node.AddControlPoint(list(point), labels[n] if labels else f"p{n}")
    return node


def rotated_roi(scene):
    """An ROI rotated about two axes, centre (10, -20, 30) RAS, size 4 x 6 x 8 mm."""
    import vtk

    node = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    node.SetSize(4, 6, 8)
    transform = vtk.vtkTransform()
    transform.Translate(10, -20, 30)
    transform.RotateZ(30)
    transform.RotateX(-20)
    node.GetObjectToNodeMatrix().DeepCopy(transform.GetMatrix())
    node.Modified()
    return node


@pytest.mark.parametrize("system", SYSTEMS)
def test_points_saved_by_slicer(tmp_path, slicer_scene, system):
    node = point_list(slicer_scene, POINTS_RAS)
    node.AddControlPoint([0.0, 0.0, 0.0], "not placed")
    node.SetNthControlPointPositionMissing(3)
    path = tmp_path / f"points_{system}.mrk.json"
    save_node(slicer_scene, node, path, system)
    assert json.loads(path.read_text())["markups"][0]["coordinateSystem"] == system

    np.testing.assert_allclose(read_points(path), POINTS_RAS, atol=1e-9)


@pytest.mark.parametrize("system", SYSTEMS)
def test_roi_saved_by_slicer(tmp_path, slicer_scene, system):
    node = rotated_roi(slicer_scene)
    path = tmp_path / f"roi_{system}.mrk.json"
    save_node(slicer_scene, node, path, system)

    roi = read_roi(path)
    np.testing.assert_allclose(roi.center_ras, [10, -20, 30], atol=1e-9)
    np.testing.assert_allclose(roi.size, [4, 6, 8], atol=1e-9)
    for column, getter in enumerate((node.GetXAxis, node.GetYAxis, node.GetZAxis)):
        axis = [0.0, 0.0, 0.0]
        getter(axis)
        np.testing.assert_allclose(roi.axes_ras[:, column], axis, atol=1e-9)
    centre = roi.center_ras
    for corner in roi.corners_ras():
        assert node.IsPointInROIWorld(list(centre + 0.99 * (corner - centre)))
        assert not node.IsPointInROIWorld(list(centre + 1.01 * (corner - centre)))


@pytest.mark.parametrize("system", SYSTEMS)
def test_slicer_loads_written_points(tmp_path, slicer_scene, system):
    path = write_points(tmp_path / "ours.mrk.json", POINTS_RAS, ["a", "b", "c"], system)
    node_id = slicer_scene.markups.LoadMarkups(str(path))
    node = slicer_scene.scene.GetNodeByID(node_id)
    assert node is not None and node.GetNumberOfControlPoints() == 3
    for n, expected in enumerate(POINTS_RAS):
        np.testing.assert_allclose(node.GetNthControlPointPosition(n), expected, atol=1e-9)
        assert node.GetNthControlPointLabel(n) == "abc"[n]
    np.testing.assert_allclose(read_points(path), POINTS_RAS)


def test_slicer_loads_written_roi(tmp_path, slicer_scene):
    """A rotated ROI we write loads in Slicer with the same centre, size and axes."""
    node = rotated_roi(slicer_scene)
    saved = tmp_path / "slicer.mrk.json"
    save_node(slicer_scene, node, saved, "LPS")
    roi = read_roi(saved)
    path = write_roi(tmp_path / "ours.mrk.json", roi)
    loaded = slicer_scene.scene.GetNodeByID(slicer_scene.markups.LoadMarkups(str(path)))
    assert loaded is not None and loaded.IsA("vtkMRMLMarkupsROINode")
    np.testing.assert_allclose(loaded.GetCenter(), roi.center_ras, atol=1e-6)
    np.testing.assert_allclose(loaded.GetSize(), roi.size, atol=1e-6)
    again = read_roi(path)
    np.testing.assert_allclose(again.axes_ras, roi.axes_ras, atol=1e-9)
    for corner in again.corners_ras():
        centre = again.center_ras
        assert loaded.IsPointInROIWorld(list(centre + 0.99 * (corner - centre)))
        assert not loaded.IsPointInROIWorld(list(centre + 1.01 * (corner - centre)))


def test_corners_of_axis_aligned_box():
    roi = Roi(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]), np.eye(3))
    corners = roi.corners_ras()
    np.testing.assert_allclose(corners.min(axis=0), [0, 0, 0])
    np.testing.assert_allclose(corners.max(axis=0), [2, 4, 6])
    assert len({tuple(c) for c in corners}) == 8


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_points(tmp_path / "none.mrk.json")


def test_malformed_json(tmp_path):
    path = tmp_path / "bad.mrk.json"
    path.write_text('{"markups": [')
    with pytest.raises(InputError, match="not valid markups JSON"):
        read_points(path)


def test_no_markups(tmp_path):
    path = tmp_path / "empty.mrk.json"
    path.write_text('{"@schema": "x", "markups": []}')
    with pytest.raises(InputError, match="no 'markups' list"):
        read_roi(path)


def test_line_given_as_points_names_its_type(tmp_path, slicer_scene):
    node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode")
    node.AddControlPoint([0.0, 0.0, 0.0])
    node.AddControlPoint([1.0, 1.0, 1.0])
    save_node(slicer_scene, node, tmp_path / "line.mrk.json", "LPS")
    with pytest.raises(InputError, match="'Line'.*point list"):
        read_points(tmp_path / "line.mrk.json")
    with pytest.raises(InputError, match="'Line'.*ROI"):
        read_roi(tmp_path / "line.mrk.json")


def test_roi_given_as_points_suggests_box(tmp_path, slicer_scene):
    save_node(slicer_scene, rotated_roi(slicer_scene), tmp_path / "roi.mrk.json", "LPS")
    with pytest.raises(InputError, match="'ROI'.*box"):
        read_points(tmp_path / "roi.mrk.json")


def test_points_given_as_roi(tmp_path, slicer_scene):
    save_node(slicer_scene, point_list(slicer_scene, POINTS_RAS), tmp_path / "p.mrk.json", "LPS")
    with pytest.raises(InputError, match="'Fiducial'.*ROI"):
        read_roi(tmp_path / "p.mrk.json")


def test_empty_point_list(tmp_path, slicer_scene):
    save_node(slicer_scene, point_list(slicer_scene, []), tmp_path / "none.mrk.json", "LPS")
    with pytest.raises(InputError, match="no placed"):
        read_points(tmp_path / "none.mrk.json")


def test_written_file_survives_failed_write(tmp_path):
    path = write_points(tmp_path / "p.mrk.json", POINTS_RAS)
    before = path.read_bytes()
    with pytest.raises(InputError, match="3 points but 1 labels"):
        write_points(path, POINTS_RAS, ["only one"])
    assert path.read_bytes() == before
