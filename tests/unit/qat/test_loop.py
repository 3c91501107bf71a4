"""The loop through ``train()``: callbacks see every event in order, and stage-scoped hooks do not leak."""

from lowbit_deploy.qat.callbacks import TrainCallback
from lowbit_deploy.qat.trainer import train
from lowbit_deploy.recipes import parse_recipe


class _Events(TrainCallback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, run):
        self.events.append(("train_begin", run.step))

    def on_stage_begin(self, run):
        self.events.append(("stage_begin", run.stage.label, run.step))
        self.hooks = sum(len(block._forward_hooks) for block in [*run.student.down_blocks, *run.student.up_blocks])
        self.events.append(("hooks", self.hooks > 0))

    def on_step_end(self, run, losses):
        self.events.append(("step", run.step, losses.feature is not None))

    def on_stage_end(self, run):
        self.events.append(("stage_end", run.stage.label))

    def on_train_end(self, run):
        blocks = [*run.student.down_blocks, *run.student.up_blocks, *run.teacher.down_blocks, *run.teacher.up_blocks]
        self.events.append(("train_end", run.step, sum(len(block._forward_hooks) for block in blocks)))


def test_callbacks_see_the_stages_in_order_and_feature_hooks_only_in_stage_one(tmp_path, tiny_digits_model_dir,
                                                                                 two_stage_recipe_dict):
    events = _Events()
    train(parse_recipe(two_stage_recipe_dict), tmp_path / "run", model_path=str(tiny_digits_model_dir),
          progress=False, callbacks=(events,))
    assert events.events == [
        ("train_begin", 0),
        ("stage_begin", "1-distill", 0), ("hooks", True), ("step", 1, True), ("step", 2, True),
        ("stage_end", "1-distill"),
        ("stage_begin", "2-noise", 2), ("hooks", False), ("step", 3, False), ("step", 4, False),
        ("stage_end", "2-noise"),
        ("train_end", 4, 0),
    ]
