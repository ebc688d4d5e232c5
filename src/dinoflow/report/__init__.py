"""What the curator reads: retrieval grids (`grids`), attention maps (`attention`) and the self-contained
reports/index.html + reports/metrics.json (`html`, page template in `template`); shared plotting in `figures`."""
