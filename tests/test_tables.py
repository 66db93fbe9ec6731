"""Plain-text tables: format_table and pivot."""

from pifa.tables import format_table, pivot


def test_format_table_aligns_columns_of_every_row():
    text = format_table([{"method": "svd", "ppl": 12.5}, {"method": "mpifa", "ppl": 9.25, "note": "x"}])
    lines = text.splitlines()
    assert lines[0].split() == ["method", "ppl", "note"]
    assert lines[2].split() == ["svd", "12.5"] and lines[3].split() == ["mpifa", "9.25", "x"]
    assert len({len(line) for line in lines}) == 1
    assert format_table([]) == "(empty)"


def test_pivot_puts_one_value_per_row_and_column_and_leaves_gaps_empty():
    rows = [{"run": "mpifa/uniform", "density": 0.5, "ppl": 63.1}, {"run": "mpifa/uniform", "density": 0.7, "ppl": 35.9},
            {"run": "mpifa/sensitivity", "density": 0.7, "ppl": 29.7}]
    assert pivot(rows, "run", "density", "ppl") == [{"run": "mpifa/uniform", "0.5": 63.1, "0.7": 35.9},
                                                    {"run": "mpifa/sensitivity", "0.5": "", "0.7": 29.7}]
    assert pivot(rows + [{"run": "mpifa/uniform", "density": 0.5, "ppl": 60.0}], "run", "density", "ppl")[0]["0.5"] == 60.0
