"""`lmm demo`: every stage of the pipeline on one preset, timed, ending in RUN_DIR/report.html."""
from __future__ import annotations

from pathlib import Path

from lmm import dist, pipeline
from lmm.evaluate import evaluate_run
from lmm.io import save_json
from lmm.report import build_report


def run_demo(cfg: dict) -> Path:
    """Train teacher, make pairs, train student, evaluate teacher and student at several NFE, report."""
    run = pipeline.run_dir(cfg)
    dist.init_distributed(cfg["run"]["device"])
    if dist.is_main():
        save_json(run / "config.json", cfg)
    timer = pipeline.Timer(run / "timings.json")
    with timer.stage("train teacher"):
        teacher = pipeline.train_teacher(cfg)
    with timer.stage("generate pairs"):
        store = pipeline.generate_pairs(cfg, teacher_path=teacher)
    with timer.stage("train student"):
        student = pipeline.train_student(cfg, store=store, teacher_path=teacher)
    with timer.stage("sample + evaluate"):
        evaluate_run(cfg, teacher, student)
    return build_report(run, title=f"LMM demo: {cfg['data']['name']}") if dist.is_main() else run
