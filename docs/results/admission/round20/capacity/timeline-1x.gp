set terminal pngcairo noenhanced size 900,230
set output 'build/admexp/r20/capacity/timeline-1x.png'
set multiplot layout 1,1
set key outside right
set xlabel 'time (s)'
set ylabel 'req/s'
set title 'none at 1x capacity'
plot 'build/admexp/r20/capacity/timeline-1x-none.dat' u 1:5 w steps lw 2 t 'goodput', '' u 1:2 w l t 'admitted', '' u 1:3 w l t 'held', '' u 1:4 w l t 'rejected'
unset multiplot
