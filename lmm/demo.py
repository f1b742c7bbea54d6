"""`lmm demo`: every stage of the pipeline on one preset, timed, ending in RUN_DIR/report.html."""
from __future__ import annotations

from pathlib import Path

from lmm import dist, pipeline
from lmm.evaluate import evaluate_run
from lmm.report import build_report
from lmm.runs import Timer, record_config, run_dir


def run_demo(cfg: dict) -> Path:
    """Train teacher, make pairs, train student, evaluate teacher and student at several NFE, report."""
    run = run_dir(cfg)
    dist.init_distributed(cfg["run"]["device"], deterministic=cfg["run"]["deterministic"])
    pipeline.check_stages(cfg)
    timer = Timer(run / "timings.json")
    with timer.stage("train teacher"):
        teacher = pipeline.train_teacher(cfg)
    record_config(cfg, "teacher")
    with timer.stage("generate pairs"):
        store = pipeline.generate_pairs(cfg, teacher_path=teacher)
    record_config(cfg, "pairs")
    with timer.stage("train student"):
        student = pipeline.train_student(cfg, store=store, teacher_path=teacher)
    record_config(cfg, "student")
    with timer.stage("sample + evaluate"):
        evaluate_run(cfg, teacher, student)
    record_config(cfg, "eval")
    return build_report(run, title=f"LMM demo: {cfg['data']['name']}") if dist.is_main() else run
