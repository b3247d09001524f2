"""PRDModule fills the teachers' prompt caches from the data at the start of fit (rank 0 under DDP)."""

from tests.prd_helpers import ColorTeacher, fast_trainer, tiny_data, tiny_module

TRAIN = ["a red ball", "a blue cube", "a red ball", "a green cone"]
VAL = ["a yellow donut"]


class RecordingTeacher(ColorTeacher):
    def __init__(self):
        super().__init__()
        self.prepared: list[list[str]] = []

    def prepare_prompts(self, prompts):
        self.prepared.append(list(prompts))
        return len(prompts)


def test_train_and_val_prompts_are_prepared_once(tiny_sd_dir, tmp_path):
    teacher = RecordingTeacher()
    module = tiny_module(tiny_sd_dir, teachers={"color": teacher})
    fast_trainer(tmp_path, max_steps=1).fit(module, datamodule=tiny_data(prompts=TRAIN, val=VAL))
    assert teacher.prepared == [["a red ball", "a blue cube", "a green cone", "a yellow donut"]]


def test_large_libraries_are_encoded_lazily(tiny_sd_dir, tmp_path):
    teacher = RecordingTeacher()
    module = tiny_module(tiny_sd_dir, teachers={"color": teacher}, prepare_prompt_cache=2)
    fast_trainer(tmp_path, max_steps=1).fit(module, datamodule=tiny_data(prompts=TRAIN, val=VAL))
    assert teacher.prepared == [["a yellow donut"]]  # 4 train prompts > 2: left to the ranks that need them
