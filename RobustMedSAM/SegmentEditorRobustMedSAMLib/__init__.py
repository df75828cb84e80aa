from SegmentEditorEffects.AbstractScriptedSegmentEditorEffect import *  # noqa: F403

from .SegmentEditorEffect import *  # noqa: F403
